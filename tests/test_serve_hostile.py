"""Hostile input (issue 22, section 6): values that pass the door but used to break the decode
step, failures that must stay inside one request, and the door checks themselves."""

from __future__ import annotations

import asyncio

import pytest
import torch

from conftest import build_tiny
from personafuse.moe.routing import Routing
from personafuse.serving import batcher as batcher_module
from personafuse.serving.batcher import Batcher, Job
from personafuse.serving.decode import BatchDecode, RowSpec

torch.set_num_threads(1)
PROMPTS = ["i am so anxious", "please help me solve this math problem", "write a poem", "hello"]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


def decode_all(model, prompts, specs, weights=None):
    """Run one BatchDecode; per row: the text, the finish reason and the error (if any)."""
    w = torch.full((len(prompts), 10), 0.1) if weights is None else weights
    texts, reasons, errors = [""] * len(prompts), [None] * len(prompts), [None] * len(prompts)
    for events in BatchDecode(model, prompts, w, specs):
        for ev in events:
            texts[ev.row] += ev.delta
            if ev.finished:
                reasons[ev.row], errors[ev.row] = ev.finish_reason, ev.error
    return texts, reasons, errors


def greedy_alone(model, prompt, n=8):
    texts, _, _ = decode_all(model, [prompt], [RowSpec(max_new_tokens=n)])
    return texts[0]


def test_tiny_temperature_is_greedy_and_tiny_top_p_keeps_one_token(tiny):
    """temperature 1e-40 used to divide the logits into NaN, top_p 1e-300 to keep no token at all
    (500 for the whole batch). vLLM's rule: below 1e-5 is greedy; top-p keeps at least one token."""
    specs = [
        RowSpec(max_new_tokens=8),
        RowSpec(max_new_tokens=8, temperature=1e-40),
        RowSpec(max_new_tokens=8, temperature=1.0, top_p=1e-300, seed=1),
        RowSpec(max_new_tokens=8, temperature=1.5, top_p=0.0, seed=2),
    ]
    texts, reasons, errors = decode_all(tiny, PROMPTS, specs)
    assert errors == [None] * 4
    assert texts == [greedy_alone(tiny, p) for p in PROMPTS]  # each of them is the greedy reply
    assert all(r in ("stop", "length") for r in reasons)


def test_a_row_that_fails_ends_alone(tiny):
    """A seed torch cannot take (>= 2**64) used to raise in the batch's constructor; NaN logits in
    one row used to fail the sampling of every row. Now only that row ends, with an error."""
    specs = [RowSpec(max_new_tokens=8), RowSpec(max_new_tokens=8, temperature=1.0, seed=2**64), RowSpec(max_new_tokens=8)]
    texts, reasons, errors = decode_all(tiny, PROMPTS[:3], specs)
    assert reasons == [reasons[0], "error", reasons[2]] and reasons[0] in ("stop", "length")
    assert errors[0] is None and errors[2] is None and "seed" in errors[1]
    assert texts[0] == greedy_alone(tiny, PROMPTS[0]) and texts[2] == greedy_alone(tiny, PROMPTS[2])

    def poison_row_1(_module, _args, out):  # the model itself goes wrong for one row only
        out.logits[1] = float("nan")
        return out

    handle = tiny.base_model.register_forward_hook(poison_row_1)
    try:
        specs = [RowSpec(max_new_tokens=8), RowSpec(max_new_tokens=8, temperature=1.0, seed=3), RowSpec(max_new_tokens=8)]
        texts, reasons, errors = decode_all(tiny, PROMPTS[:3], specs)
    finally:
        handle.remove()
    assert reasons[1] == "error" and "NaN" in errors[1]
    assert errors[0] is None and texts[0] == greedy_alone(tiny, PROMPTS[0])
    assert errors[2] is None and texts[2] == greedy_alone(tiny, PROMPTS[2])


def _collect(job: Job) -> list[tuple[str, object]]:
    out = []
    while not job.events.empty():
        out.append(job.events.get_nowait())
    return out


def test_batcher_fails_only_the_broken_request(tiny):
    """Inside the worker: a routing that breaks (a value that slipped past the door) and a seed
    torch rejects each fail their own request, with a message that does not leak exception text;
    the request batched with them gets its full reply."""

    async def main() -> list[list[tuple[str, object]]]:
        loop = asyncio.get_running_loop()
        broken = Routing("blend", weights={"high_A": 1}, alpha=0.5)
        broken.alpha = "half"  # what a raw string used to do inside the step
        jobs = [
            Job([{"role": "user", "content": PROMPTS[0]}], Routing(), RowSpec(max_new_tokens=6), loop),
            Job([{"role": "user", "content": PROMPTS[1]}], broken, RowSpec(max_new_tokens=6), loop),
            Job([{"role": "user", "content": PROMPTS[2]}], Routing(), RowSpec(6, temperature=1.0, seed=2**70), loop),
        ]
        batcher = Batcher(tiny, max_batch=8, batch_wait_s=0.5)
        try:
            for j in jobs:
                batcher.submit(j)
            await asyncio.sleep(0)
            for _ in range(600):  # bounded wait for every job's last event
                if all(any(k in ("end", "error") for k, _ in list(j.events._queue)) for j in jobs):
                    break
                await asyncio.sleep(0.05)
        finally:
            await asyncio.to_thread(batcher.close)
        return [_collect(j) for j in jobs]

    good, bad_routing, bad_seed = asyncio.run(main())
    failed = getattr(batcher_module, "GENERATION_FAILED", "generation failed inside the server")
    assert [k for k, _ in good][0] == "start" and good[-1][0] == "end"
    assert bad_routing == [("error", failed)]
    assert bad_seed[0][0] == "start" and bad_seed[-1] == ("error", failed)
    for _kind, payload in bad_routing + bad_seed:
        assert "Overflow" not in str(payload) and "TypeError" not in str(payload)
