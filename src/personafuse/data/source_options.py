"""``SourceOptions``: which queries a run reads (``load_source``'s options). A module of its own,
light to import, so that ``personafuse data generate`` takes its source flags' defaults and help
from these fields, and ``data.sources`` its keyword defaults, each written once."""

from __future__ import annotations

from dataclasses import dataclass

from personafuse.configs import help_field


@dataclass
class SourceOptions:
    source: str = help_field("seeds", "seeds | file:PATH | sharegpt|wildchat|personahub|infinity[:HUB_ID_OR_PATH]")
    limit: int | None = help_field(None, "Use at most N queries from the source.")
    shuffle: bool = help_field(False, "Shuffle the seed set or file before --limit (Hub sources always sample).")
    seed: int = help_field(0, "Seed for sampling and shuffling.")
    # Hub sources (and local files in a Hub dataset's schema) only:
    lang: str | None = help_field("en", "Hub sources: keep this language ('' for all).")
    min_chars: int = help_field(8, "Hub sources: shortest query kept.")
    max_chars: int = help_field(4000, "Hub sources: longest query kept.")
    config: str | None = help_field(None, "Hub sources: dataset config name.")
    split: str | None = help_field(None, "Hub sources: split.")
