"""Data generation against a misbehaving endpoint (issue 28): one test per fault of the issue's
table, against a real OpenAI-compatible server on loopback (the stub teacher with
:class:`Faults`). Client and server share a virtual clock (tests/virtual_clock.py) that moves only
by waits, so a 60 s Retry-After or a 40 s outage costs milliseconds and no result depends on how
loaded the machine is."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
from pathlib import Path

import pytest

from data_fixtures import lines, write_jsonl
from personafuse.data.config import PipelineConfig
from personafuse.data.prompts import pole_label
from personafuse.data.run import EndpointFailuresExceeded, RunSummary, generate
from personafuse.data.sources import Query, seed_queries
from personafuse.data.store import ShardStore
from personafuse.data.teachers import GenParams, OpenAITeacher, TeacherError, TeacherRequestError
from personafuse.endpoint import RetryPolicy, parse_retry_after
from personafuse.training.records import load_records
from stub_teacher import Faults, StubServer, poles_for
from virtual_clock import VirtualClock

QUERIES = [Query(q.text, "seeds", q.situation) for q in seed_queries()[:40]]


def _gen(server: StubServer, clock: VirtualClock, out: Path, queries: list[Query] = QUERIES,
         teacher_kw: dict | None = None, summary: RunSummary | None = None, retry_reasons: tuple[str, ...] = (),
         **cfg: object) -> RunSummary:
    """One ``data generate`` run with the CLI's defaults for an HTTP teacher (32 in flight)."""
    t = OpenAITeacher("stub", base_url=server.base_url, clock=clock, **(teacher_kw or {}))

    async def go() -> RunSummary:
        try:
            with ShardStore(out) as st:
                return await generate(queries, t, st, PipelineConfig(**cfg), summary=summary,
                                      retry_reasons=retry_reasons)  # type: ignore[arg-type]
        finally:
            await t.aclose()

    return asyncio.run(go())


def _served(faults: Faults, clock: VirtualClock) -> StubServer:
    return StubServer(faults=faults, clock=clock)


def _no_cut_step(recs: list[dict]) -> None:
    """Every record holds the stub's whole reply for every step: both cues, every pole it names,
    the whole answer and the rationale."""
    for r in recs:
        social, task = poles_for(r["query"])
        assert sorted(r["traits"]) == sorted({*social, *task}), r["raw"]["traits"]
        assert r["cues"]["task"] == "A clear, well organised answer that addresses the request."
        assert r["response"].endswith(r["query"]) and r["rationale"].startswith("The reply shows")
        assert all(pole_label(p) in r["rationale"] for p in social + task)


def test_retry_after_every_form_is_read() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after({"retry-after": "1"}, now) == 1.0
    assert parse_retry_after({"retry-after": "0.25"}, now) == 0.25
    assert parse_retry_after({"retry-after": "0"}, now) == 0.0
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}, now) == 1.5  # the precise one first
    assert parse_retry_after({"retry-after": email.utils.formatdate(now + 60, usegmt=True)}, now) == 60.0
    assert parse_retry_after({"retry-after": email.utils.formatdate(now - 60, usegmt=True)}, now) == 0.0  # past
    assert parse_retry_after({"retry-after": "-3"}, now) == 0.0
    assert parse_retry_after({"retry-after": "soon"}, now) is None
    assert parse_retry_after({}, now) is None
    import random

    rng = random.Random(0)
    p = RetryPolicy()
    waits = [p.rate_limit_delay(0, 1.0, rng) for _ in range(200)]
    assert min(waits) >= 1.0 and max(waits) - min(waits) > 0.3  # never early, and spread out
    assert min(p.rate_limit_delay(0, 0.0, rng) for _ in range(50)) >= p.backoff  # Retry-After 0 is not a busy loop
    assert min(p.rate_limit_delay(0, 60.0, rng) for _ in range(50)) >= 60.0  # no 30 s cap


@pytest.mark.parametrize("retry_after", ["1", "0"])
def test_rate_limit_5_per_second_keeps_every_query(tmp_path: Path, retry_after: str) -> None:
    clock = VirtualClock()
    with _served(Faults(rate_limit=5, retry_after=retry_after), clock) as server:
        t0 = clock.monotonic()
        s = _gen(server, clock, tmp_path)
        took = clock.monotonic() - t0
    assert (s.records, s.rejected) == (40, 0)
    e = s.endpoint
    assert e is not None and e.http_status[200] == 120 and e.http_status[429] > 40
    # 429s come out of their own budget: far more of them than --max-retries 5 per request
    assert e.retries == e.http_status[429] and e.rate_limit_wait_s > 0
    assert min(clock.sleeps) >= 1.0  # Retry-After honoured (and a 0 treated as "back off a little")
    assert len({round(x, 3) for x in clock.sleeps}) > len(clock.sleeps) // 2  # jittered, not in lockstep
    assert took >= 120 / 5 - 1  # the limit really held (the bucket starts with one second's worth)
    print(f"Retry-After {retry_after}: {took:.1f} clock s for 120 requests at 5/s ({took / 24:.2f}x ideal)")
    info = json.loads((tmp_path / "run.json").read_text())["endpoint"]
    assert info["http_status"]["429"] == e.http_status[429] and info["requests"] == e.requests
    assert info["rejects_by_cause"] == {"endpoint": 0, "teacher": 0}


def test_retry_after_60_and_http_date_are_waited_in_full(tmp_path: Path) -> None:
    clock = VirtualClock()
    for header in ("60", "date+60"):
        clock.sleeps.clear()
        with _served(Faults(rate_limit=1 / 60, retry_after=header), clock) as server:
            s = _gen(server, clock, tmp_path / header.replace("+", ""), QUERIES[:1])
        assert s.records == 1
        assert len(clock.sleeps) == 2 and min(clock.sleeps) >= 59.0  # steps 2 and 3 each waited a minute
        assert s.endpoint is not None and s.endpoint.rate_limit_wait_s >= 118


def test_rate_limit_budget_and_insufficient_quota(tmp_path: Path) -> None:
    clock = VirtualClock()
    msgs = [{"role": "user", "content": "hello"}]
    with _served(Faults(rate_limit=1 / 3600, retry_after="600"), clock) as server:
        t = OpenAITeacher("stub", base_url=server.base_url, clock=clock, max_rate_limit_wait=1000)

        async def two() -> None:
            await t.complete(msgs, GenParams(8))  # the bucket's one token
            with pytest.raises(TeacherRequestError, match="still rate-limited") as ei:
                await t.complete(msgs, GenParams(8))
            assert ei.value.reason == "endpoint_status"
            await t.aclose()

        asyncio.run(two())
        assert clock.sleeps and sum(clock.sleeps) <= 1000  # gave up within its own budget
    with _served(Faults(insufficient_quota=True), clock) as server:
        with pytest.raises(TeacherError, match="insufficient_quota"):
            _gen(server, clock, tmp_path / "quota")
        assert server.state.requests <= 32  # stopped at once: no retries, no further queries


@pytest.mark.parametrize("fault", ["malformed", "empty"])
def test_bad_200s_are_retried_not_rejected(tmp_path: Path, fault: str) -> None:
    clock = VirtualClock()
    faults = Faults(malformed=0.2) if fault == "malformed" else Faults(empty=0.15)
    with _served(faults, clock) as server:
        s = _gen(server, clock, tmp_path)
        assert server.state.statuses[200] > 125  # the bad replies were there
    assert (s.records, s.rejected) == (40, 0)
    assert s.endpoint is not None and s.endpoint.retries >= 10
    _no_cut_step(lines(tmp_path, "records"))


def test_replies_cut_at_the_token_limit_never_make_a_record(tmp_path: Path) -> None:
    clock = VirtualClock()
    qs = [Query(q.text + " [paper]" if i % 2 else q.text, "seeds") for i, q in enumerate(seed_queries()[:60])]
    with _served(Faults(length=0.35), clock) as server:
        s = _gen(server, clock, tmp_path / "three", qs)
        assert 2 * 256 in server.state.max_tokens_seen and 2 * 384 in server.state.max_tokens_seen
        assert 2 * 1024 in server.state.max_tokens_seen  # each step retried with twice its budget
        one = _gen(server, clock, tmp_path / "single", qs[:20], single_call=True)
    assert s.records + s.rejected == 60 and s.reasons["truncated_response"] >= 1
    assert set(s.reasons) == {"truncated_response"}  # a cut is never "unparseable" or a lost pole
    steps = {r["step"] for r in lines(tmp_path / "three", "rejects")}
    assert steps <= {"cues", "traits", "response"} and len(steps) >= 2
    recs = lines(tmp_path / "three", "records")
    assert len(recs) == s.records >= 30
    _no_cut_step(recs)
    assert one.records + one.reasons["truncated_response"] == 20
    for r in lines(tmp_path / "single", "records"):
        assert r["response"].endswith(r["query"]) and r["rationale"] == "It uses the traits."


def test_trickling_server_ends_within_its_deadline() -> None:
    clock = VirtualClock()
    with _served(Faults(trickle=5.0), clock) as server:
        t = OpenAITeacher("stub", base_url=server.base_url, clock=clock, timeout=10, max_retries=1)

        async def one() -> None:
            with pytest.raises(TeacherRequestError, match="within --timeout 10") as ei:
                await t.complete([{"role": "user", "content": "hi"}], GenParams(8))
            assert ei.value.reason == "endpoint_timeout"
            await t.aclose()

        t0 = clock.monotonic()
        asyncio.run(one())
        took = clock.monotonic() - t0
    # two attempts of 10 s and one backoff; the ~300-byte reply alone would take 1500 s
    assert took < 2 * 10 + 1 + 10


def test_outage_then_plain_rerun_completes_every_query(tmp_path: Path) -> None:
    clock = VirtualClock()
    with _served(Faults(outage=(0.0, 40.0)), clock) as server:
        summary = RunSummary()
        with pytest.raises(EndpointFailuresExceeded, match="rerun the same command") as ei:
            _gen(server, clock, tmp_path, summary=summary)
        assert "more than --max-endpoint-failures 5%" in str(ei.value)
        failed = summary.rejects_by_cause()["endpoint"]
        assert failed > 2 and summary.reasons["endpoint_status"] == failed  # more than 5 % of 40
        info = json.loads((tmp_path / "run.json").read_text())["endpoint"]
        assert info["http_status"]["503"] > 0 and info["rejects_by_cause"]["endpoint"] == failed
        asyncio.run(clock.sleep(max(0.0, 41 - clock.monotonic())))  # the endpoint is back
        again = _gen(server, clock, tmp_path)
    assert again.skipped == 40 - failed and again.records == failed and again.rejected == 0
    recs = lines(tmp_path, "records")
    assert len(recs) == 40 and len({r["id"] for r in recs}) == 40
    info = json.loads((tmp_path / "run.json").read_text())["endpoint"]
    assert info["rejects_by_cause"] == {"endpoint": 0, "teacher": 0}  # standing rejects: none left


def _old_folder(tmp_path: Path, server: StubServer, clock: VirtualClock) -> Path:
    """A folder as older versions left it: teacher_error rejects, and one query with a reject
    followed by a record, which --retry-reasons teacher_error used to redo again and again."""
    out = tmp_path / "old"
    _gen(server, clock, out, QUERIES[:10])
    recs = lines(out, "records")
    shard = sorted(out.glob("records-*.jsonl"))[0]
    shard.write_text("".join(json.dumps(r) + "\n" for r in recs[:8]))  # 2 queries lost ...
    rejects = [{"key": r["id"], "id": r["id"], "query": r["query"], "reason": "teacher_error", "detail": "HTTP 500"}
               for r in recs[7:]]  # ... as teacher_error, one of them (recs[7]) redone later
    write_jsonl(out / "rejects-00009.jsonl", rejects)
    with open(shard, "a") as f:  # a duplicate record, as a redone key used to leave
        f.write(json.dumps(recs[0]) + "\n")
    return out


def test_retry_reasons_twice_never_duplicates_and_old_duplicates_are_repaired(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = VirtualClock()
    with _served(Faults(), clock) as server:
        out = _old_folder(tmp_path, server, clock)
        with caplog.at_level(logging.WARNING, logger="personafuse.training.records"):
            assert len(load_records(out)) == 8  # training keys by id: the duplicate is dropped ...
        assert "1 duplicate record line(s) dropped" in caplog.text  # ... and said so
        with ShardStore(out) as st:  # the next run repairs the folder and says so
            assert any("removed 1 duplicate record line" in note for note in st.repairs)
            assert len(st.record_keys) == 8 and set(st.reject_reasons.values()) == {"teacher_error"}
        for _ in range(2):
            s = _gen(server, clock, out, QUERIES[:10], retry_reasons=("teacher_error",))
    recs = lines(out, "records")
    assert len(recs) == 10 and len({r["id"] for r in recs}) == 10  # repaired, completed, no duplicate
    assert s.skipped == 10 and s.records == 0


def test_cli_every_reply_empty_exits_non_zero_and_reports(tmp_path: Path) -> None:
    """60 queries, every reply empty: the 50-in-a-row rule fires, the exit is non-zero, and the
    output says what the endpoint did; a torn line from a killed run is repaired and reported."""
    src = write_jsonl(tmp_path / "q.jsonl", [{"query": f"Question number {i} about the sea?"} for i in range(60)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "records-00000.jsonl").write_text('{"id": "torn", "query": "a kill cut this li')
    from typer.testing import CliRunner

    from personafuse.data.cli import app

    with StubServer(faults=Faults(empty=1.0)) as server:
        r = CliRunner().invoke(app, ["generate", "--teacher", "openai:stub", "--base-url", server.base_url, "--source",
                                     f"file:{src}", "--out", str(out), "--backoff", "0.001", "--max-retries", "1",
                                     "--no-progress"])
    assert r.exit_code == 2 and "in a row failed at the endpoint" in r.output and "rerun the same command" in r.output
    assert "records-00000.jsonl: removed a torn last line" in r.output
    summary = json.loads(next(ln for ln in r.output.splitlines() if ln.startswith('{"total"')))
    assert summary["records"] == 0 and summary["reasons"]["endpoint_empty"] >= 50
    assert summary["endpoint"]["rejects_by_cause"]["endpoint"] >= 50 and summary["endpoint"]["retries"] >= 50
    assert "HTTP 200 x" in r.output and "retries" in r.output  # the closing line
    from personafuse.data.stats import compute_stats

    st = compute_stats(out)  # what `data stats --json` prints
    assert st["endpoint"]["http_status"]["200"] >= 100 and st["rejects_by_cause"]["endpoint"] >= 50
    assert set(st["endpoint"]) == {"requests", "retries", "http_status", "rate_limit_wait_s", "rejects_by_cause"}
    table = CliRunner().invoke(app, ["stats", str(out), "--png", str(tmp_path / "s.png")]).stdout
    assert "Endpoint (all runs into this folder)" in table and "rejects by cause: endpoint" in table


def test_eval_subject_rides_out_the_same_faults() -> None:
    from personafuse.evaluation.subjects import OpenAISubject

    clock = VirtualClock()
    with _served(Faults(malformed=0.3, rate_limit=20, retry_after="1"), clock) as server:
        subj = OpenAISubject("stub", base_url=server.base_url, concurrency=8, clock=clock)
        prompts = [f"prompt number {i}" for i in range(24)]
        gens = subj.generate(prompts, max_new_tokens=16)
    assert [g.text for g in gens] == [f"Plain answer to: {p}" for p in prompts]
    st = subj.endpoint.stats
    assert st.http_status[200] > 24 and st.retries > 0 and subj.usage["requests"] == 24


def test_cli_exit_1_when_endpoint_failures_pass_the_limit_then_a_plain_rerun_finishes(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from personafuse.data.cli import app

    out = tmp_path / "out"
    args = ["generate", "--teacher", "openai:stub", "--source", "seeds", "--limit", "4", "--out", str(out),
            "--backoff", "0.001", "--max-retries", "0", "--no-progress"]
    with StubServer(faults=Faults(empty=1.0)) as server:
        res = CliRunner().invoke(app, [*args, "--base-url", server.base_url])
    assert res.exit_code == 1 and "4 of 4 queries failed at the endpoint (endpoint_empty 4)" in res.output
    assert "more than --max-endpoint-failures 5%" in res.output and "rerun the same command" in res.output
    with StubServer() as server:  # the endpoint is healthy again: the same command, nothing added
        res = CliRunner().invoke(app, [*args, "--base-url", server.base_url])
    assert res.exit_code == 0, res.output
    assert len(lines(out, "records")) == 4
