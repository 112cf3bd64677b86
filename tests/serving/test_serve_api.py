"""The OpenAI-compatible server on a real uvicorn socket, driven by the official openai client."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
import torch

from conftest import build_tiny
from personafuse.serving import ServeConfig, create_app
from personafuse.traits import TRAIT_POLES
from serve_support import LiveServer, metric

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


@pytest.fixture(scope="module")
def server(tiny):
    cfg = ServeConfig(model_name="tiny", max_tokens_limit=24, max_prompt_tokens=40, default_max_tokens=8, batch_wait_ms=30)
    with LiveServer(create_app(tiny, cfg)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["queue_depth"] == 0


def test_non_streaming_carries_weights(client, tiny):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "i am so anxious about my exam"}], max_tokens=6, temperature=0
    )
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    persona = r.model_extra["persona"]
    assert persona["mode"] == "router"
    assert list(persona["weights"]) == list(TRAIT_POLES)
    want = tiny.route(["i am so anxious about my exam"])[0].tolist()  # the router's own weights
    assert list(persona["weights"].values()) == pytest.approx(want, abs=1e-4)
    assert 1 <= r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 5


def test_streaming_matches_non_streaming(client):
    kw = dict(
        model="tiny",
        messages=[{"role": "user", "content": "please help me solve this math problem"}],
        max_tokens=10,
        temperature=0,
        extra_body={"persona": {"mode": "pole", "pole": "high_C"}},
    )
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].model_extra["persona"]["weights"]["high_C"] == 1.0  # weights arrive before the text
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals and finals[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert finals[-1].model_extra["persona"] == full.model_extra["persona"]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


@pytest.mark.parametrize(
    ("persona", "check"),
    [
        ({"mode": "pole", "pole": "low_N"}, lambda w: w["low_N"] == 1.0),
        ({"weights": {"high_A": 3, "low_N": 1}}, lambda w: w["high_A"] == pytest.approx(0.75) and w["low_N"] == pytest.approx(0.25)),
        ({"mode": "fixed", "weights": [1] * 10}, lambda w: all(v == pytest.approx(0.1) for v in w.values())),
        ({"mode": "top_k", "k": 2}, lambda w: sum(v > 0 for v in w.values()) == 2),
        ({"mode": "random", "k": 2, "seed": 3}, lambda w: sorted(w.values())[-2:] == [0.5, 0.5]),
        ({"mode": "blend", "alpha": 1.0, "weights": {"high_O": 1}}, lambda w: w["high_O"] == pytest.approx(1.0)),
    ],
)
def test_persona_modes(client, persona, check):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=2, extra_body={"persona": persona}
    )
    w = r.model_extra["persona"]["weights"]
    assert check(w), w
    assert r.model_extra["persona"]["mode"] == persona.get("mode", "fixed")


def test_random_route_draws_the_same_experts_as_generate(tiny, client):
    """A seeded Random Route is keyed by the query text: the server must draw what
    PersonaFuseModel.generate draws for the same seed and query (it once resolved without keys)."""
    from personafuse import Routing

    for query in ("hello", "i am so anxious about my exam", "write me a poem about the sea"):
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": query}], max_tokens=1,
            extra_body={"persona": {"mode": "random", "k": 2, "seed": 11}},
        )
        served = list(r.model_extra["persona"]["weights"].values())
        local = tiny.generate([query], max_new_tokens=1, routing=Routing("random", k=2, seed=11))[0].weights
        assert served == pytest.approx(list(local.values())), query


def test_router_reads_the_whole_conversation(tiny, client):
    conv = [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "i am so sad about my job"},
        {"role": "assistant", "content": "i am so sorry"},
        {"role": "user", "content": "what is two plus three"},
    ]
    r = client.chat.completions.create(model="tiny", messages=conv, max_tokens=2)
    got = torch.tensor(list(r.model_extra["persona"]["weights"].values()))
    assert torch.allclose(got, tiny.route([conv])[0], atol=1e-5)
    assert not torch.allclose(got, tiny.route(["what is two plus three"])[0], atol=1e-4)


BAD = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}], "persona": {"weights": [1, 2, 3]}}, 400, "3 entries"),
    ({"messages": [{"role": "user", "content": "hi"}], "persona": {"weights": [1] * 9 + [-1]}}, 400, "low_N is negative"),
    ({"messages": [{"role": "user", "content": "hi"}], "persona": {"weights": {"high_Q": 1}}}, 400, "unknown pole 'high_Q'"),
    ({"messages": [{"role": "user", "content": "hi"}], "persona": {"mode": "pole", "pole": "mid_A"}}, 400, "unknown pole"),
    ({"messages": [{"role": "user", "content": "hi"}], "persona": {"mode": "loud"}}, 400, "unknown routing mode 'loud'"),
    ({"messages": [{"role": "user", "content": "hi"}], "persona": {"mode": "top_k", "k": 11}}, 400, "'k'"),
    ({"messages": [{"role": "user", "content": "hi"}], "persona": {"colour": 1}}, 400, "colour"),
    ({"messages": [{"role": "user", "content": "hi"}], "persona": "high_A"}, 400, "persona"),
    ({"messages": [{"role": "user", "content": "hi " * 60}]}, 400, "at most 40"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 25}, 400, "max_tokens is 25"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n=1"),
    ({"messages": [{"role": "system", "content": "hi"}]}, 400, "role 'user'"),
]


@pytest.mark.parametrize(("body", "status", "needle"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_name_the_problem(server, body, status, needle):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, **kw)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"], r.json()


def test_openai_client_sees_bad_request_and_server_keeps_serving(client):
    with pytest.raises(openai.BadRequestError, match="high_Q"):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], extra_body={"persona": {"mode": "pole", "pole": "high_Q"}}
        )
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].message.content is not None


def test_concurrent_requests_batch_with_different_mixtures(server):
    poles = list(TRAIT_POLES)[:8]
    results: dict[str, dict] = {}

    def one(pole: str) -> None:
        r = httpx.post(
            server.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": f"help me with my {pole} work"}], "max_tokens": 4, "persona": {"pole": pole}},
            timeout=60,
        )
        results[pole] = r.json()

    before = _batch_hist(httpx.get(server.url + "/metrics").text, "step_batch_size")
    threads = [threading.Thread(target=one, args=(p,)) for p in poles]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for pole in poles:
        assert results[pole]["persona"]["weights"][pole] == 1.0, results[pole]
    after = _batch_hist(httpx.get(server.url + "/metrics").text, "step_batch_size")
    # Some decoding step since `before` ran more than one request (each with its own pole).
    assert after["count"] > before["count"]
    assert after["le1"] - before["le1"] < after["count"] - before["count"]


def _batch_hist(text: str, name: str = "batch_size") -> dict[str, float]:
    return {"count": metric(text, f"personafuse_{name}_count"), "le1": metric(text, f"personafuse_{name}_bucket", le=1)}


def test_metrics_text(server):
    """/metrics parses as Prometheus text (prometheus_client's parser) with the server's families."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["personafuse_requests"].type == "counter"
    assert families["personafuse_request_latency_seconds"].type == "histogram"
    assert families["personafuse_queue_depth"].type == "gauge"
    assert not [s.name for f in families.values() for s in f.samples if s.name.endswith("_created")]
    assert metric(text, "personafuse_requests_total", endpoint="chat_completions", code=200) >= 1
    assert metric(text, "personafuse_requests_total", endpoint="chat_completions", code=400) >= 1
    assert metric(text, "personafuse_completion_tokens_total") > 0 and metric(text, "personafuse_prompt_tokens_total") > 0
    assert metric(text, "personafuse_request_latency_seconds_count") == metric(text, "personafuse_request_latency_seconds_bucket", le="+Inf") > 0
    assert metric(text, "personafuse_queue_depth") == 0


def test_api_key(tiny):
    cfg = ServeConfig(model_name="tiny", api_key="s3cret", max_tokens_limit=8, default_max_tokens=2)
    with LiveServer(create_app(tiny, cfg)) as s:
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="invalid API key"):
            bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}]).model_extra["persona"]
        assert httpx.get(s.url + "/health").status_code == 200  # health stays open for probes


def test_full_queue_gets_429_and_everything_else_completes(tiny):
    cfg = ServeConfig(model_name="tiny", max_batch=1, max_queue=2, batch_wait_ms=0, max_tokens_limit=24)
    with LiveServer(create_app(tiny, cfg)) as s:
        codes: list[int] = []
        bodies: list[dict] = []
        retry_after: list[str | None] = []  # checked in the main thread: a thread's assert fails nothing
        lock = threading.Lock()

        def one() -> None:
            r = httpx.post(
                s.url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 24, "temperature": 0},
                timeout=60,
            )
            with lock:
                codes.append(r.status_code)
                bodies.append(r.json())
                if r.status_code == 429:
                    retry_after.append(r.headers.get("retry-after"))

        threads = [threading.Thread(target=one) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
        assert retry_after == ["1"] * codes.count(429)
        for b in bodies:
            if "error" in b:
                assert "busy" in b["error"]["message"]
            else:
                assert b["choices"][0]["finish_reason"] in ("stop", "length")
        assert httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 200


def test_decode_loop_matches_generate(tiny):
    """The streaming decode loop gives the same greedy tokens as HF generate for a mixed batch."""
    from personafuse.serving.decode import BatchDecode, RowSpec

    prompts = ["i am so anxious", "please help me solve this math problem with x plus y"]
    w = torch.zeros(2, 10)
    w[0, 6] = 1.0
    w[1, :] = 0.1
    ref = tiny.generate(prompts, weights=w, max_new_tokens=8)
    dec = BatchDecode(tiny, prompts, w, [RowSpec(max_new_tokens=8), RowSpec(max_new_tokens=8)])
    texts = ["", ""]
    for events in dec:
        for ev in events:
            texts[ev.row] += ev.delta
    assert [t.strip() for t in texts] == [g.text for g in ref]
    assert dec.prompt_tokens == [g.prompt_tokens for g in ref]


def test_stop_sequences_and_json_body(server):
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "temperature": 0}),
        headers={"content-type": "application/json"},
    ).json()
    text = r["choices"][0]["message"]["content"]
    words = text.split()
    assert len(words) >= 3, text  # the stop check below must run, not be skipped
    stop = " " + words[2]
    r2 = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "temperature": 0, "stop": stop},
    ).json()
    assert r2["choices"][0]["message"]["content"] == text[: text.find(stop)]
    assert r2["choices"][0]["finish_reason"] == "stop"


def test_evaluation_subject_records_weights_from_the_server(server, tiny):
    """`personafuse eval --model openai:...` against this server keeps each reply's weights."""
    from personafuse.evaluation.subjects import OpenAISubject

    subject = OpenAISubject("tiny", base_url=server.url + "/v1", api_key="x", concurrency=2, max_retries=0)
    queries = ["i am so anxious", "what is two plus three"]
    gens = subject.generate(queries, max_new_tokens=3)
    for g, want in zip(gens, tiny.route(queries).tolist(), strict=True):  # each reply its own query's
        assert g.weights is not None and list(g.weights) == list(TRAIT_POLES)
        assert list(g.weights.values()) == pytest.approx(want, abs=1e-4)


def test_shutdown_finishes_requests_in_flight(tiny):
    cfg = ServeConfig(model_name="tiny", max_batch=1, batch_wait_ms=0, max_tokens_limit=24)
    live = LiveServer(create_app(tiny, cfg))
    codes: list[int] = []

    def one() -> None:
        r = httpx.post(
            live.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 24, "temperature": 0},
            timeout=60,
        )
        codes.append(r.status_code if r.json()["choices"][0]["finish_reason"] else -1)

    with live:
        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for _ in range(2000):  # bounded: wait until all six have arrived (a connection not yet read is closed on exit)
            h = httpx.get(live.url + "/health").json()
            answered = metric(httpx.get(live.url + "/metrics").text, "personafuse_requests_total", endpoint="chat_completions", code=200)
            if h["running"] + h["queue_depth"] + answered >= 6:
                break
        live.server.should_exit = True  # what SIGTERM does
        for t in threads:
            t.join(60)
    assert codes == [200] * 6


def test_seeded_sampling_is_reproducible_whatever_the_batch(server):
    body = {"messages": [{"role": "user", "content": "write a poem"}], "max_tokens": 12, "temperature": 1.0, "seed": 42}
    alone = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    out: dict[int, dict] = {}

    def one(i: int) -> None:
        b = body if i == 0 else {**body, "seed": 100 + i}
        out[i] = httpx.post(server.url + "/v1/chat/completions", json=b, timeout=60).json()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # Each row samples with its own generator, so batch-mates do not change a seeded reply.
    assert out[0]["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]
    assert len({o["choices"][0]["message"]["content"] for o in out.values()}) > 1
