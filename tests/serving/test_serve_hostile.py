"""Hostile input (issue 22, section 6): values that pass the door but used to break the decode
step, failures that must stay inside one request, and the door checks themselves."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
import torch

from conftest import build_tiny
from personafuse.moe.routing import Routing
from personafuse.serving import ServeConfig, create_app
from personafuse.serving import batcher as batcher_module
from personafuse.serving.batcher import Batcher, Job
from personafuse.serving.decode import BatchDecode, RowSpec
from serve_support import LiveServer, metric

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
        if out.logits.shape[0] == 3:  # while row 1 is in the batch (a failed row leaves it)
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


@pytest.fixture(scope="module")
def server(tiny):
    cfg = ServeConfig(model_name="tiny", max_tokens_limit=24, max_prompt_tokens=40, default_max_tokens=8, batch_wait_ms=200)
    with LiveServer(create_app(tiny, cfg)) as s:
        yield s


def chat(url, body, **kw):
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60, **kw)


def test_hostile_values_in_one_batch_never_fail_the_others(server):
    """The audit's requests sent together (one batch): each gets a 200 (handled as the conventions
    say) or a 400 naming its field; the ordinary request batched with them gets its reply."""
    user = [{"role": "user", "content": "i am so anxious"}]
    cases = {
        "plain": ({"messages": user, "max_tokens": 6, "temperature": 0}, 200, None),
        "tiny_temperature": ({"messages": user, "max_tokens": 6, "temperature": 1e-40}, 200, None),
        "tiny_top_p": ({"messages": user, "max_tokens": 6, "temperature": 1.0, "top_p": 1e-300}, 200, None),
        "huge_seed": ({"messages": user, "max_tokens": 6, "temperature": 1.0, "seed": 2**64}, 400, "seed"),
        "alpha_string": (
            {"messages": user, "max_tokens": 6, "persona": {"mode": "blend", "alpha": "0.5", "weights": {"high_A": 1}}},
            200,
            None,
        ),
        "random_seed_string": ({"messages": user, "max_tokens": 6, "persona": {"mode": "random", "seed": "x"}}, 400, "persona"),
        "random_seed_huge": ({"messages": user, "max_tokens": 6, "persona": {"mode": "random"}, "seed": 2**70}, 400, "seed"),
    }
    results: dict[str, httpx.Response] = {}

    def one(name: str) -> None:
        results[name] = chat(server.url, cases[name][0])

    threads = [threading.Thread(target=one, args=(n,)) for n in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for name, (_, status, param) in cases.items():
        r = results[name]
        assert r.status_code == status, (name, r.text)
        if status == 400:
            assert r.json()["error"]["param"] == param, (name, r.json())
    greedy = results["plain"].json()["choices"][0]["message"]["content"]
    assert results["tiny_temperature"].json()["choices"][0]["message"]["content"] == greedy
    assert results["tiny_top_p"].json()["choices"][0]["message"]["content"] == greedy
    assert results["alpha_string"].json()["persona"]["alpha"] == 0.5


HOSTILE = [
    # (raw body, content type, status, needle in the message, param)
    (b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json", 400, "nests deeper", None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "persona": ' + b"[" * 100 + b"]" * 100 + b"}", "application/json", 400, "nests deeper", "persona"),
    (b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}', "application/json", 400, "surrogate", "messages.0.content"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udfff"]}', "application/json", 400, "surrogate", "stop.0"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "persona": {"pole": "\\ud83d"}}', "application/json", 400, "surrogate", "persona.pole"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}", "application/json", 400, "too many digits", None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "application/json", 400, "NaN is not a JSON value", None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 40 + b"}", "application/json", 400, "seed", "seed"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1' + b"0" * 400 + b"}", "application/json", 400, "temperature", "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "text/plain", 415, "application/json", "Content-Type"),
    (b"messages=hi", "application/x-www-form-urlencoded", 415, "application/json", "Content-Type"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "", 415, "application/json", "Content-Type"),
]


@pytest.mark.parametrize(("raw", "ctype", "status", "needle", "param"), HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
def test_no_bare_500s(server, raw, ctype, status, needle, param):
    """Deep nesting, lone surrogates, huge integers, non-JSON numbers and non-JSON content types:
    a 4xx in the OpenAI error shape naming the problem (they were 500s, or a text/plain body was served)."""
    headers = {"content-type": ctype} if ctype else {}  # no header at all for ""
    r = httpx.post(server.url + "/v1/chat/completions", content=raw, headers=headers, timeout=60)
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert needle in err["message"] and err["param"] == param, err
    assert "Traceback" not in r.text and "Error:" not in err["message"]


def test_rejections_are_counted_and_unknown_paths_use_the_error_shape(server):
    before = httpx.get(server.url + "/metrics").text
    assert httpx.post(server.url + "/v1/chat/completions", content=b"{}", headers={"content-type": "text/plain"}).status_code == 415
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == 405
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    after = httpx.get(server.url + "/metrics").text
    for endpoint, code in (("chat_completions", 415), ("other", 404)):
        count = [metric(t, "personafuse_requests_total", endpoint=endpoint, code=code) for t in (before, after)]
        assert count[1] == count[0] + 1, (endpoint, code)


def test_weights_that_overflow_when_summed_are_not_zeroed(server):
    """Ten weights of 1e308 sum to inf; dividing by it used to report (and mix) ten zeros."""
    user = [{"role": "user", "content": "hi"}]
    r = chat(server.url, {"messages": user, "max_tokens": 1, "persona": {"weights": [1e308] * 10}})
    assert r.status_code == 200 and list(r.json()["persona"]["weights"].values()) == pytest.approx([0.1] * 10)
    r = chat(server.url, {"messages": user, "max_tokens": 1, "persona": {"weights": {"high_A": 1.5e308, "low_N": 1.5e308}}})
    w = r.json()["persona"]["weights"]
    assert w["high_A"] == pytest.approx(0.5) and w["low_N"] == pytest.approx(0.5)


def test_top_p_zero_is_in_range_and_keeps_the_top_token(server):
    """OpenAI's range for top_p is [0, 1]: 0 is served (the most likely token), not refused."""
    user = [{"role": "user", "content": "write a poem"}]
    greedy = chat(server.url, {"messages": user, "max_tokens": 6, "temperature": 0}).json()
    r = chat(server.url, {"messages": user, "max_tokens": 6, "temperature": 1.3, "top_p": 0, "seed": 5})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]
    assert chat(server.url, {"messages": user, "top_p": 1.01}).status_code == 400


def test_empty_api_key_does_not_switch_authentication_off(tiny):
    with pytest.raises(ValueError, match="api_key is empty"):
        ServeConfig(api_key="")
    with pytest.raises(ValueError, match="api_key is empty"):
        create_app(tiny, ServeConfig(api_key="  "))


@pytest.mark.parametrize(("env", "args"), [({"PERSONAFUSE_API_KEY": ""}, []), ({}, ["--api-key", " "])], ids=["env", "flag"])
def test_cli_refuses_an_empty_api_key(env, args):
    """PERSONAFUSE_API_KEY="" (an unset shell variable expanded) used to serve with no authentication."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import personafuse

    src = str(Path(personafuse.__file__).resolve().parents[1])  # the code this test run imports
    base = {k: v for k, v in os.environ.items() if k != "PERSONAFUSE_API_KEY"}
    run_env = {**base, **env, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    # --port 1: should it ever get as far as serving, it fails to bind instead of hanging
    cmd = [sys.executable, "-m", "personafuse.cli", "serve", "--model", "no-such-model", "--port", "1", *args]
    p = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "key is empty" in p.stderr, p.stderr[-500:]
