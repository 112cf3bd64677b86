"""``personafuse reproduce``, the paper's whole experiment as one grid: its configuration
(:mod:`.config`), the cells and their order (:mod:`.plan`), running them (:mod:`.run`, with
:mod:`.replies` for the pairs file) and the report (:mod:`.report`)."""
