"""``ServeConfig``: what ``personafuse serve`` and ``create_app`` read (no web framework imported
here, so the CLI takes its option defaults and help from these fields at start-up)."""

from __future__ import annotations

from personafuse.configs import config_class, help_field

# A prompt longer than this many characters per allowed token is refused before it is tokenised
# (tokenising megabytes would hold a CPU for seconds). English averages ~4 characters a token;
# 32 leaves room for long words, code and whitespace runs.
CHARS_PER_TOKEN_BOUND = 32


@config_class
class ServeConfig:
    model_name: str = help_field("personafuse", "Model id reported by /v1/models and in responses.")
    api_key: str | None = help_field(None, "Require 'Authorization: Bearer KEY' on /v1/*.")
    max_batch: int = help_field(16, "Most requests decoded together in one batch.")
    max_queue: int = help_field(256, "Most requests waiting; more get HTTP 429.")
    batch_wait_ms: float = help_field(10.0, "How long the first waiting request waits for company.")
    max_prompt_tokens: int = help_field(2048, "Longest prompt accepted (chat template included).")
    max_tokens_limit: int = help_field(512, "Largest max_tokens a request may ask for.")
    default_max_tokens: int = help_field(256, "max_tokens when a request gives none.")
    default_temperature: float = help_field(0.7, "Temperature when a request gives none (0 = greedy).")
    # Bounds on what one request may cost (docs/serving.md, "Limits and errors").
    # 1 MiB: a 2,048-token prompt is ~10 KB of JSON
    max_body_bytes: int = help_field(1 << 20, "Largest request body; bigger ones get HTTP 413.")
    max_prompt_chars: int | None = help_field(  # None: CHARS_PER_TOKEN_BOUND x max_prompt_tokens
        None, f"Longest conversation in characters, refused before tokenising (default: {CHARS_PER_TOKEN_BOUND} x --max-prompt-tokens).")
    # From arrival; 0 = none. The openai client gives up at 600 s too.
    request_timeout_s: float = help_field(600.0, "Seconds from arrival a request may take; later ones end with HTTP 504 (0: no deadline).")
    # SIGTERM: in-flight requests get this long (inside Kubernetes' 30 s grace)
    drain_timeout_s: float = help_field(25.0, "On SIGTERM/SIGINT, seconds in-flight requests get to finish; the rest end with HTTP 503.")
    # Scheduling (docs/serving.md, "Scheduling"): "step" lets requests join and leave the running
    # batch between decoding steps; "batch" runs each batch to its end (the earlier behaviour).
    scheduler: str = help_field("step", "step: requests join and leave the running batch at every decoding step; batch: each batch runs to its end (the earlier scheduler, for comparison).")
    # newcomers' prompt tokens per prefill forward, between two decode steps
    prefill_chunk: int = help_field(256, "Newcomers' prompt tokens per prefill forward; running requests decode a step between two chunks.")
    # decode with the experts off (the base model alone): a load-test anchor
    base_only: bool = help_field(False, "Decode with the experts off (the base model alone; responses still report the routing): the anchor of a load test.")

    def __post_init__(self) -> None:
        from personafuse.serving.batcher import SCHEDULERS

        # An empty key used to switch authentication off without a word (e.g. PERSONAFUSE_API_KEY=""
        # from an unset shell variable): refuse it; leave the key out to run without one.
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty: give a key, or leave it out (None) to serve without authentication")
        if self.max_body_bytes < 1 or self.request_timeout_s < 0 or self.drain_timeout_s < 0:
            raise ValueError("max_body_bytes must be positive; request_timeout_s and drain_timeout_s not negative")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {self.prefill_chunk}")
        if self.max_prompt_chars is None:
            self.max_prompt_chars = CHARS_PER_TOKEN_BOUND * self.max_prompt_tokens
