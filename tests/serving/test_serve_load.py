"""64 concurrent clients with mixed personas against a real server (tiny model): every reply is
complete, the only non-200s are the documented 429s, and requests were batched."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import torch

from conftest import build_tiny
from personafuse.serving import ServeConfig, create_app
from serve_support import LiveServer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from serve_load import run_load  # noqa: E402

torch.set_num_threads(1)


def test_64_concurrent_clients_mixed_personas():
    # A small queue so that some requests meet the 429 back-pressure and retry.
    cfg = ServeConfig(model_name="tiny", max_batch=16, max_queue=24, batch_wait_ms=20, max_tokens_limit=16)
    with LiveServer(create_app(build_tiny(), cfg)) as s:
        res = asyncio.run(run_load(s.url, clients=64, requests_per_client=2, max_tokens=12, time_limit=120))
    assert res["errors"] == [] and res["ok"] == res["requests"] == 128
    assert res["retried_429"] > 0  # the bound was reached and handled
    assert res["batches_over_1"] >= 1 and res["mean_batch"] > 2, res
    assert res["completion_tokens"] > 0


def test_open_loop_arrivals_and_idle_stream_measure_what_clients_see():
    """Poisson arrivals (seeded), all streamed with mixed lengths: every reply complete, each
    request's exact token count (stream usage) adds up to the server's own counter, and the
    percentiles are ordered."""
    from serve_load import idle_stream, open_loop

    cfg = ServeConfig(model_name="tiny", max_batch=8, batch_wait_ms=0, max_tokens_limit=16)
    with LiveServer(create_app(build_tiny(), cfg)) as s:
        res = asyncio.run(open_loop(s.url, rate=20.0, n=12, max_tokens=12, time_limit=120))
        idle = idle_stream(s.url, 3, 8, 60)
    assert res["errors"] == [] and res["ok"] == 12
    assert res["ttft_p50_s"] <= res["ttft_p95_s"] <= res["latency_p95_s"]
    assert res["completion_tokens"] == res["client_tokens"] > 0 and res["tokens_per_s"] == res["completion_tokens"] / res["wall_s"]
    assert idle["errors"] == [] and idle["ttft_p50_s"] > 0 and idle["stream_tokens_per_s"] > 0


def test_percentile_is_numpys_linear_interpolation():
    import numpy as np

    from serve_load import percentile

    xs = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4]
    for q in (0, 50, 95, 100):
        assert percentile(xs, q) == np.percentile(xs, q)
    assert percentile([], 50) is None
