"""``TeacherOptions``: how ``make_teacher`` builds and drives a teacher. A module of its own, light
to import, so that ``personafuse data generate`` reads its option defaults and help from these
fields without loading the teachers and their backends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from personafuse.configs import help_field

if TYPE_CHECKING:
    from personafuse.endpoint import Clock


@dataclass
class TeacherOptions:
    """The endpoint's retry and deadline policy, local batching and placement. A plain dataclass,
    not a config class: ``clock`` holds a test clock object, and no file sets these."""

    base_url: str | None = None
    api_key: str | None = None
    max_in_flight: int = 32
    timeout: float = help_field(300.0, "Deadline of one HTTP request, send to last byte (a server that trickles its reply cannot stall the run).")
    max_retries: int = help_field(5, "Retries per request on 5xx, timeouts, dropped connections and 200s that are not a completion or are empty (429s do not count).")
    backoff: float = help_field(1.0, "First retry delay in seconds (doubles each retry).")
    max_rate_limit_wait: float = help_field(600.0, "Seconds one request may spend waiting on 429s (Retry-After honoured, jittered), in total.")
    clock: Clock | None = None  # tests and benchmarks run on a fast clock
    batch_size: int = help_field(8, "Local teachers: sequences per generate() batch.")
    device: str | None = None
    dtype: str | None = None
    gguf_file: str | None = None
