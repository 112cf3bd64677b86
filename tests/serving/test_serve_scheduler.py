"""Step-level scheduling (issue 22): rows join and leave the running batch between decoding
steps, each with its own mixture, and get the tokens they would get alone."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch

from conftest import build_tiny
from personafuse.serving import ServeConfig, create_app
from personafuse.serving.decode import BatchDecode, Prefill, RowSpec, new_row
from serve_support import LiveServer, SlowModel, metric

torch.set_num_threads(1)
CHAT = "/v1/chat/completions"
PROMPTS = [
    "i am so anxious about my exam",
    "please help me solve this math problem with x plus y times two",
    "write a poem",
    "my boss is angry about the late order and the customer service",
]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(init_range=0.3)  # decisive logits: greedy ties would make "same tokens" luck


def _weights(n: int, seed: int = 0) -> torch.Tensor:
    return torch.softmax(torch.randn(n, 10, generator=torch.Generator().manual_seed(seed)) * 2, dim=-1)


def alone(model, prompt: str, w: torch.Tensor, n: int) -> str:
    texts = [""]
    for events in BatchDecode(model, [prompt], w[None], [RowSpec(max_new_tokens=n)]):
        for ev in events:
            texts[0] += ev.delta
    return texts[0]


def run(batch, texts: dict, steps: int | None = None) -> None:
    """Step ``batch`` (``steps`` times, or until empty), collecting each row's text by tag."""
    done = 0
    while len(batch) and (steps is None or done < steps):
        for ev in batch.step():
            texts[ev.row] = texts.get(ev.row, "") + ev.delta
        done += 1


def prefilled(model, prompts, w, tags, n, chunk=None):
    p = Prefill(model, prompts, w, [new_row(RowSpec(max_new_tokens=n), t) for t in tags], chunk)
    while (batch := p.advance()) is None:
        pass
    return batch


def test_chunked_prefill_gives_the_unchunked_tokens(tiny) -> None:
    w = _weights(4)
    whole, chunked = {}, {}
    run(prefilled(tiny, PROMPTS, w, range(4), 12), whole)
    p = Prefill(tiny, PROMPTS, w, [new_row(RowSpec(max_new_tokens=12), t) for t in range(4)], chunk=3)
    rounds = 0
    while (batch := p.advance()) is None:
        rounds += 1
    assert rounds == -(-p.columns // 3) - 1  # one forward per chunk of 3 columns
    run(batch, chunked)
    assert chunked == whole and all(whole.values())


def test_rows_joining_mid_flight_get_their_tokens_alone_and_leave_when_done(tiny) -> None:
    """Two rows decode; after 5 steps two newcomers (one prefilled in chunks) join with their own
    mixtures; a short row leaves early. Every row's text is the text it gets decoded alone."""
    w = _weights(4, seed=1)
    lengths = {"a": 20, "b": 6, "c": 16, "d": 12}
    batch = prefilled(tiny, PROMPTS[:1], w[:1], ["a"], lengths["a"])
    batch.merge(prefilled(tiny, PROMPTS[1:2], w[1:2], ["b"], lengths["b"]))
    texts: dict = {}
    run(batch, texts, steps=5)
    assert [r.tag for r in batch.rows] == ["a", "b"]
    newcomers = Prefill(tiny, PROMPTS[2:], w[2:], [new_row(RowSpec(max_new_tokens=lengths[t]), t) for t in "cd"], chunk=4)
    while (joined := newcomers.advance()) is None:
        run(batch, texts, steps=1)  # the running rows go on between the newcomers' chunks
    batch.merge(joined)
    widths = []
    while len(batch):
        run(batch, texts, steps=1)
        widths.append((len(batch), batch.width if len(batch) else 0))
    for i, tag in enumerate("abcd"):
        assert texts[tag] == alone(tiny, PROMPTS[i], w[i], lengths[tag]), tag
    # a leaving row takes the columns only it used (left padding) with it
    assert all(width <= len(tiny.tokenizer(PROMPTS[1])["input_ids"]) + 40 for _, width in widths)


def test_filter_cuts_the_columns_only_leaving_rows_used(tiny) -> None:
    w = _weights(2, seed=2)
    batch = prefilled(tiny, [PROMPTS[1], "hi"], w, ["long", "short"], 8)
    wide = batch.width
    batch.rows[0].done = True
    batch.filter()
    assert [r.tag for r in batch.rows] == ["short"]
    assert batch.width == int(batch.mask.sum()) < wide  # no all-padding column is left
    assert all(layer.keys.shape[0] == 1 and layer.keys.shape[2] == batch.width for layer in batch.cache.layers)


def _chat(url: str, text: str, max_tokens: int, persona: dict | None = None) -> tuple[dict, float]:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0}
    if persona:
        body["persona"] = persona
    r = httpx.post(url + CHAT, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json(), time.monotonic()


@pytest.mark.parametrize("scheduler", ["step", "batch"])
def test_a_short_request_does_not_wait_for_a_long_one(scheduler: str) -> None:
    """A long reply is decoding when a short request arrives. Step scheduling: the short one joins
    at the next step and is answered while the long one still decodes. The earlier
    run-to-completion batching (--scheduler batch): it waits for the long one to end."""
    slow = SlowModel(step_s=0.02)
    cfg = ServeConfig(model_name="tiny", max_tokens_limit=200, max_prompt_tokens=40, scheduler=scheduler, batch_wait_ms=0)
    with LiveServer(create_app(slow.model, cfg)) as s:
        done: dict[str, float] = {}
        replies: dict[str, dict] = {}

        def post(name: str, text: str, n: int) -> None:
            replies[name], done[name] = _chat(s.url, text, n)

        long = threading.Thread(target=post, args=("long", PROMPTS[0], 100))
        long.start()
        deadline = time.monotonic() + 30
        while slow.forwards < 5 and time.monotonic() < deadline:  # the long one is decoding
            time.sleep(0.01)
        post("short", PROMPTS[2], 4)
        long.join(60)
    assert replies["long"]["usage"]["completion_tokens"] == 100 and replies["short"]["usage"]["completion_tokens"] == 4
    if scheduler == "step":
        assert done["short"] < done["long"]
    else:
        assert done["short"] >= done["long"]


def test_joining_a_busy_batch_gives_the_tokens_and_weights_of_a_request_alone(tiny) -> None:
    """Greedy output of a request is the same whether it ran alone or joined a busy batch
    mid-flight, and its response reports the mixture it decoded with."""
    cfg = ServeConfig(model_name="tiny", max_tokens_limit=200, max_prompt_tokens=40, batch_wait_ms=0, prefill_chunk=4)
    persona = {"mode": "fixed", "weights": {"high_A": 0.7, "low_N": 0.3}}
    eos = tiny.tokenizer.eos_token_id

    def no_eos(_module, _args, out):  # replies last their max_tokens: the long one stays busy
        out.logits[..., eos] = float("-inf")
        return out

    hook = tiny.base_model.register_forward_hook(no_eos)
    with LiveServer(create_app(tiny, cfg)) as s:
        quiet, _ = _chat(s.url, PROMPTS[3], 12, persona)
        body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + CHAT, json=body, timeout=120) as stream:
            lines = stream.iter_lines()
            for line in lines:  # the long reply is decoding
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break
            busy, _ = _chat(s.url, PROMPTS[3], 12, persona)
            rest = [line for line in lines if line.startswith("data: ")]
        metrics = httpx.get(s.url + "/metrics").text
    hook.remove()
    assert rest[-1] == "data: [DONE]"
    assert busy["choices"][0]["message"]["content"] == quiet["choices"][0]["message"]["content"]
    assert busy["persona"]["weights"] == pytest.approx({**dict.fromkeys(busy["persona"]["weights"], 0.0), "high_A": 0.7, "low_N": 0.3})
    steps_over_1 = metric(metrics, "personafuse_step_batch_size_bucket", le=1)
    assert metric(metrics, "personafuse_step_batch_size_count") > steps_over_1  # it did share steps


def test_base_only_serves_the_base_model_with_the_experts_off(tiny) -> None:
    """--base-only (the load benchmark's anchor): the same engine, the experts off, so the reply is
    the plain base model's greedy reply; the response still reports the routing."""
    enc = tiny.chat_inputs([PROMPTS[1]])
    with torch.no_grad(), tiny.mixture_weights(None):
        ids = tiny.base_model.generate(**enc, max_new_tokens=10, do_sample=False, temperature=None, top_p=None, top_k=None,
                                       pad_token_id=tiny.tokenizer.pad_token_id)  # fmt: skip
    plain = tiny.tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    replies = {}
    for base_only in (True, False):
        cfg = ServeConfig(model_name="tiny", max_tokens_limit=20, base_only=base_only, batch_wait_ms=0)
        with LiveServer(create_app(tiny, cfg)) as s:
            replies[base_only], _ = _chat(s.url, PROMPTS[1], 10, {"mode": "pole", "pole": "high_O"})
    assert replies[True]["choices"][0]["message"]["content"] == plain
    assert replies[False]["choices"][0]["message"]["content"] != plain  # the expert does change it
    assert replies[True]["persona"]["weights"]["high_O"] == 1.0


def test_a_client_that_leaves_gives_its_row_to_a_waiting_request() -> None:
    """One place in the batch (--max-batch 1): a long stream holds it and a short request waits.
    The streaming client leaves; at the next step its row is gone, the waiting request takes the
    place and is answered, and the server keeps serving."""
    slow = SlowModel(step_s=0.02)
    cfg = ServeConfig(model_name="tiny", max_batch=1, batch_wait_ms=0, max_tokens_limit=200, max_prompt_tokens=40)
    with LiveServer(create_app(slow.model, cfg)) as s:
        got: dict[str, dict] = {}
        body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 100, "stream": True}
        with httpx.stream("POST", s.url + CHAT, json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if '"content"' in line)  # it is decoding
            waiting = threading.Thread(target=lambda: got.update(short=_chat(s.url, PROMPTS[2], 5)[0]))
            waiting.start()
            deadline = time.monotonic() + 30
            while httpx.get(s.url + "/health").json()["queue_depth"] != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert httpx.get(s.url + "/health").json()["queue_depth"] == 1
        # the stream's client is gone
        waiting.join(60)
        again, _ = _chat(s.url, PROMPTS[1], 3)
    assert got["short"]["usage"]["completion_tokens"] == 5 and again["usage"]["completion_tokens"] == 3
    assert slow.forwards < 100  # the long reply did not run to its end first
