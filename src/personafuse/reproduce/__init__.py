"""The paper's whole experiment as one grid (issue 20): its configuration (:mod:`.config`) and the
cells it runs (:mod:`.plan`). Running the cells and writing the report are not built yet."""
