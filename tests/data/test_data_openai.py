"""The OpenAI-compatible teacher path end to end against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest

from data_fixtures import cli, lines, stub_server, write_jsonl
from personafuse.data.config import PipelineConfig
from personafuse.data.run import generate
from personafuse.data.sources import Query
from personafuse.data.store import ShardStore
from personafuse.data.teachers import GenParams, OpenAITeacher, TeacherError, TeacherRequestError
from personafuse.traits import TRAIT_POLES
from stub_teacher import StubServer


@pytest.fixture()
def stub():
    yield from stub_server()


def _run(queries: list[Query], teacher: OpenAITeacher, out: Path, **cfg: object):
    async def go():
        try:
            with ShardStore(out) as st:
                return await generate(queries, teacher, st, PipelineConfig(**cfg))  # type: ignore[arg-type]
        finally:
            await teacher.aclose()

    return asyncio.run(go())


def test_both_poles_of_one_trait_is_an_option_with_a_counted_reject_by_default(stub: StubServer, tmp_path: Path) -> None:
    """The paper does not state "never both poles of one trait": by default such replies are counted
    'both_poles' rejects; --allow-both-poles keeps them as records (and a resume must agree)."""
    qs = [Query("q [bothpoles]", "test"), Query("How do I fix a flat tyre?", "test")]
    strict = _run(qs, OpenAITeacher("stub", base_url=stub.base_url, max_in_flight=2), tmp_path / "strict", concurrency=2)
    assert (strict.records, dict(strict.reasons)) == (1, {"both_poles": 1})
    kept = _run(qs, OpenAITeacher("stub", base_url=stub.base_url, max_in_flight=2), tmp_path / "kept", concurrency=2, allow_both_poles=True)
    assert kept.records == 2 and not kept.reasons
    rec = next(r for r in lines(tmp_path / "kept", "records") if r["query"] == "q [bothpoles]")
    assert any(rec["p"][2 * t] and rec["p"][2 * t + 1] for t in range(5))  # high and low of one trait
    assert json.loads((tmp_path / "kept" / "run.json").read_text())["allow_both_poles"] is True
    assert "allow_both_poles" not in json.loads((tmp_path / "strict" / "run.json").read_text())


def test_well_formed_malformed_and_failing_replies(stub: StubServer, tmp_path: Path) -> None:
    qs = [Query(t, "test") for t in [
        "How do I fix a flat tyre?", "tell me a joke [malformed]", "q [allzero]", "q [unknown]", "q [bothpoles]",
        "q [empty]", "q [truncated]", "q in the paper's layout [paper]", "flaky [500x2]", "busy [429x1]", "q [down]",
        "How do I fix a flat  TYRE?",
    ]]
    t = OpenAITeacher("stub", base_url=stub.base_url, max_retries=3, backoff=0.01, max_in_flight=4)
    s = _run(qs, t, tmp_path, concurrency=4, max_endpoint_failures="1")
    assert s.records == 4 and s.rejected == 8
    assert dict(s.reasons) == {
        "unparseable": 1, "all_zero_p": 1, "unknown_pole": 1, "both_poles": 1, "empty_response": 1,
        "truncated_response": 1, "endpoint_status": 1, "duplicate_query": 1,
    }
    recs = {r["query"]: r for r in lines(tmp_path, "records")}
    assert set(recs) == {"How do I fix a flat tyre?", "q in the paper's layout [paper]", "flaky [500x2]", "busy [429x1]"}
    for r in recs.values():
        assert len(r["p"]) == len(TRAIT_POLES) and sum(r["p"]) >= 1
        assert r["traits"] == [TRAIT_POLES[i] for i, v in enumerate(r["p"]) if v]
        assert r["response"].startswith("Thanks for asking") and r["rationale"].startswith("The reply shows")
        assert r["cues"]["social"] and r["cues"]["task"]
        assert set(r["raw"]) >= {"cues", "traits", "response"} and all(r["raw"][k] for k in ("cues", "traits", "response"))
        assert r["teacher"] == "openai:stub" and r["prompt_version"] and r["mode"] == "persona_cot"
    # retries really happened over HTTP: 3 steps x 2 failures, 3 steps x one 429, 4 attempts for [down]
    assert stub.state.statuses[500] == 3 * 2 + 4
    assert stub.state.statuses[429] == 3
    assert t.retries == 3 * 2 + 3 + 3
    rejects = {r["query"]: r for r in lines(tmp_path, "rejects")}
    assert "Sure! I think" in rejects["tell me a joke [malformed]"]["raw"]["traits"]  # raw text kept
    assert rejects["q [down]"]["reason"] == "endpoint_status" and "500" in rejects["q [down]"]["detail"]
    assert rejects["q [down]"]["step"] == "cues"  # the endpoint reject names the step that failed


def test_single_call_and_baseline_modes(stub: StubServer, tmp_path: Path) -> None:
    qs = [Query("What is a prime number?"), Query("Write a haiku [empty]")]
    base = stub.base_url
    s = _run(qs, OpenAITeacher("stub", base_url=base), tmp_path / "one", single_call=True)
    assert s.records == 1 and dict(s.reasons) == {"empty_response": 1}
    rec = lines(tmp_path / "one", "records")[0]
    assert rec["response"].startswith("A single-call answer") and sum(rec["p"]) == 2
    for mode in ("direct", "human_like"):
        s = _run(qs, OpenAITeacher("stub", base_url=base), tmp_path / mode, mode=mode)
        assert s.records == 1 and dict(s.reasons) == {"empty_response": 1}
        rec = lines(tmp_path / mode, "records")[0]
        assert rec["p"] is None and rec["cues"] is None and rec["mode"] == mode
        assert rec["response"] == "Plain answer to: What is a prime number?"


def test_concurrency_cap_and_timeout(stub: StubServer) -> None:
    """--max-in-flight caps the requests the endpoint sees at once (and lets that many through);
    an attempt past --timeout fails after 1 + --max-retries attempts instead of waiting for the reply.
    Told by what the stub saw, not by wall time: the stub holds every reply until the test releases it."""
    hold = stub.state.hold = threading.Event()

    async def capped() -> list[str]:
        t = OpenAITeacher("stub", base_url=stub.base_url, max_in_flight=4)
        jobs = asyncio.gather(*(t.complete([{"role": "user", "content": f"q{i}"}], GenParams(16)) for i in range(8)))
        # the cap's worth lined up at the stub (a bounded wait: a client that sends fewer fails below,
        # not by hanging); then an uncapped client would get the other four there too
        for _ in range(3000):
            if stub.state.in_flight >= 4 or jobs.done():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        hold.set()
        done = await jobs
        await t.aclose()
        return [c.text for c in done]

    texts = asyncio.run(capped())
    assert len(texts) == 8 and all(texts)
    assert stub.state.requests == 8 and stub.state.in_flight == 0
    assert stub.state.max_in_flight == 4  # never more than the cap at once, and the cap really in parallel

    hold.clear()  # the next reply never comes while the teacher waits

    async def timed_out() -> tuple[int, int, int]:
        t = OpenAITeacher("stub", base_url=stub.base_url, timeout=0.5, max_retries=1, backoff=0.01)
        try:
            with pytest.raises(TeacherRequestError, match="timeout"):
                await t.complete([{"role": "user", "content": "q held"}], GenParams(16))
            return t.retries, stub.state.requests, stub.state.statuses[200]  # read before the stub may reply
        finally:
            hold.set()
            await t.aclose()

    retries, requests, replies = asyncio.run(timed_out())
    assert (retries, requests) == (1, 8 + 2)  # one attempt and one retry reached the stub, then it gave up
    assert replies == 8  # without a reply to the held request: it failed on its deadline


def test_fatal_status_and_missing_key(stub: StubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        t = OpenAITeacher("stub", base_url=stub.base_url.replace("/v1", "/nope"))
        with pytest.raises(TeacherError, match="404"):
            await t.complete([{"role": "user", "content": "x"}], GenParams(8))
        await t.aclose()

    asyncio.run(go())
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(TeacherError, match="OPENAI_API_KEY"):
        OpenAITeacher("gpt-x")
    monkeypatch.setenv("OPENAI_BASE_URL", stub.base_url)
    assert OpenAITeacher("stub").base_url == stub.base_url  # environment variable honoured


def test_server_down_aborts_instead_of_rejecting_everything(stub: StubServer, tmp_path: Path) -> None:
    qs = [Query(f"query {i} [down]") for i in range(10)]
    t = OpenAITeacher("stub", base_url=stub.base_url, max_retries=0)
    with pytest.raises(TeacherError, match="in a row failed at the endpoint"):
        _run(qs, t, tmp_path, concurrency=1, max_consecutive_errors=3)
    # and a plain rerun (no --retry-reasons) picks them up again
    t = OpenAITeacher("stub", base_url=stub.base_url, max_retries=0)

    async def again():
        with ShardStore(tmp_path) as st:
            done_before = len(st.done_keys)
            s = await generate(qs[:2], t, st, PipelineConfig(concurrency=1, max_endpoint_failures="100%"))
            await t.aclose()
            return done_before, s

    done_before, s = asyncio.run(again())
    assert done_before == 3 and s.skipped == 0 and s.reasons["endpoint_status"] == 2


def test_cli_generate_against_http_teacher(stub: StubServer, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "q.jsonl", [{"instruction": f"Question number {i}?", "cat": "maths"} for i in range(6)])
    out = tmp_path / "out"
    r = cli("generate", "--teacher", "openai:stub", "--base-url", stub.base_url, "--api-key", "k",
            "--source", f"file:{src}", "--field", "query=instruction", "--field", "situation=cat",
            "--limit", "5", "--out", str(out), "--concurrency", "3")
    assert '"records": 5' in r.stdout
    assert "generate" in r.stderr and "rejected=0" in r.stderr  # progress bar with counts
    recs = lines(out, "records")
    assert len(recs) == 5 and {x["situation"] for x in recs} == {"maths"}
    # the same command again is a no-op resume
    r = cli("generate", "--teacher", "openai:stub", "--base-url", stub.base_url, "--source", f"file:{src}",
            "--field", "query=instruction", "--field", "situation=cat", "--limit", "5", "--out", str(out))
    assert '"skipped": 5' in r.stdout and len(lines(out, "records")) == 5
    # a different mode into the same folder is refused with a clear message
    r = cli("generate", "--teacher", "openai:stub", "--base-url", stub.base_url, "--source", f"file:{src}",
            "--field", "query=instruction", "--mode", "direct", "--out", str(out), check=False)
    assert r.returncode == 2 and "different settings" in r.stderr and "mode" in r.stderr


def test_a_parser_bug_rejects_one_query_and_keeps_the_raw_text(
    stub: StubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import personafuse.data.persona_cot as pc

    def buggy(text: str):
        raise ZeroDivisionError("simulated parser bug")

    monkeypatch.setattr(pc, "parse_traits", buggy)
    qs = [Query("boom goes the parser"), Query("What is the capital of France?")]
    s = _run(qs, OpenAITeacher("stub", base_url=stub.base_url), tmp_path)
    assert s.records == 0 and dict(s.reasons) == {"unparseable": 2}  # the run went on after the first
    rej = next(r for r in lines(tmp_path, "rejects") if r["query"] == "boom goes the parser")
    assert "ZeroDivisionError" in rej["detail"] and rej["raw"]["traits"] and rej["raw"]["cues"]
