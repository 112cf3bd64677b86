"""One data-generation run: every query of a source through the Persona-CoT pipeline into a shard
store, resumable. Queries done by an earlier run are skipped, duplicates and failures become
counted rejections (one line each), endpoint failures are retried on the next run, and a teacher
that keeps failing stops the run."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from personafuse.data import prompts
from personafuse.data.config import PipelineConfig
from personafuse.data.persona_cot import PersonaCoT, QueryTrace
from personafuse.data.sources import Query
from personafuse.data.store import ShardStore
from personafuse.data.teachers import Teacher, TeacherError
from personafuse.data.validation import DUPLICATE, ENDPOINT_REJECTS, UNPARSEABLE, Rejection
from personafuse.endpoint import EndpointStats


@dataclass
class RunSummary:
    total: int = 0  # queries in the source
    skipped: int = 0  # already done by an earlier run
    records: int = 0
    rejected: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    endpoint: EndpointStats | None = None  # HTTP teachers: live request counters

    def rejects_by_cause(self) -> dict[str, int]:
        """Endpoint faults vs the teacher's writing (duplicates in the source are neither)."""
        endpoint = sum(n for r, n in self.reasons.items() if r in ENDPOINT_REJECTS)
        return {"endpoint": endpoint, "teacher": self.rejected - endpoint - self.reasons.get(DUPLICATE, 0)}

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"total": self.total, "skipped": self.skipped, "records": self.records,
                             "rejected": self.rejected, "reasons": dict(self.reasons), "seconds": self.seconds,
                             "rejects_by_cause": self.rejects_by_cause()}
        if self.endpoint is not None:  # the layout of run.json's "endpoint"
            d["endpoint"] = {**self.endpoint.as_dict(), "rejects_by_cause": self.rejects_by_cause()}
        return d


class EndpointFailuresExceeded(TeacherError):
    """The run finished, but more queries failed at the endpoint than ``--max-endpoint-failures``."""


def _reject_line(q: Query, key: str, rej: Rejection, cfg: PipelineConfig, teacher: Teacher,
                 ctx: QueryTrace | None) -> dict[str, Any]:
    return {
        "key": key,
        "id": q.id,
        "query": q.text,
        "situation": q.situation or "",
        "source": q.source,
        "mode": cfg.mode,
        "reason": rej.reason,
        "detail": rej.detail,
        "step": rej.step,
        "teacher": teacher.name,
        "prompt_version": prompts.PROMPT_VERSION,
        "timings": ctx.timings if ctx else None,
        "raw": ctx.raw if ctx else None,
    }


ProgressFn = Callable[[RunSummary], None]


def _plan(queries: Iterable[Query], store: ShardStore, cfg: PipelineConfig, teacher: Teacher,
          retry: set[str], summary: RunSummary) -> list[Query]:
    """The queries to run: not done before, or rejected for a reason being retried. A key with a
    record is never redone; repeats of a query become counted ``duplicate_query`` rejects."""
    seen: Counter[str] = Counter()
    work: list[Query] = []
    for q in queries:
        summary.total += 1
        qid = q.id
        seen[qid] += 1
        if seen[qid] > 1:
            key = f"dup:{qid}:{seen[qid] - 1}"
            if key in store.done_keys:
                summary.skipped += 1
                continue
            store.write_reject(_reject_line(q, key, Rejection(DUPLICATE, f"same normalised query as id {qid}"),
                                            cfg, teacher, None))
            summary.rejected += 1
            summary.reasons[DUPLICATE] += 1
            continue
        if qid in store.record_keys or (qid in store.done_keys and store.reject_reasons.get(qid) not in retry):
            summary.skipped += 1
            continue
        work.append(q)
    return work


async def generate(
    queries: Iterable[Query],
    teacher: Teacher,
    store: ShardStore,
    cfg: PipelineConfig,
    *,
    retry_reasons: Iterable[str] = (),
    on_start: Callable[[int], None] | None = None,
    progress: ProgressFn | None = None,
    summary: RunSummary | None = None,
) -> RunSummary:
    """Process every query not yet in ``store``; duplicates become counted rejections.

    Endpoint rejects (and the older ``teacher_error``) are always retried; ``retry_reasons`` adds
    teacher reasons. Raises :class:`TeacherError` when the endpoint cannot serve the run, after
    ``max_consecutive_errors`` endpoint rejects in a row, or (:class:`EndpointFailuresExceeded`,
    once every query was tried) when endpoint rejects exceed ``max_endpoint_failures``. Pass a
    ``summary`` to keep the counters when it raises; the endpoint counters go into ``run.json``.
    """
    t_start = time.perf_counter()
    store.check_settings(cfg.settings(teacher))
    summary = summary if summary is not None else RunSummary()
    summary.endpoint = teacher.endpoint_stats
    base = teacher.endpoint_stats.as_dict() if teacher.endpoint_stats is not None else None
    work = _plan(queries, store, cfg, teacher, set(retry_reasons) | ENDPOINT_REJECTS, summary)
    if on_start:
        on_start(len(work))
    if progress:
        progress(summary)
    try:
        await _run_work(work, PersonaCoT(teacher, cfg), store, cfg, teacher, summary, progress)
    finally:
        summary.seconds = time.perf_counter() - t_start
        if teacher.endpoint_stats is not None:
            store.add_endpoint_counters(_delta(teacher.endpoint_stats.as_dict(), base))
    failed = summary.rejects_by_cause()["endpoint"]
    if failed > cfg.endpoint_failure_limit(len(work)):
        causes = ", ".join(f"{r} {n}" for r, n in sorted(summary.reasons.items()) if r in ENDPOINT_REJECTS)
        raise EndpointFailuresExceeded(
            f"{failed} of {len(work)} queries failed at the endpoint ({causes}), more than --max-endpoint-failures "
            f"{cfg.max_endpoint_failures} allows; the {summary.records} records written are kept. Once the endpoint "
            f"is healthy, rerun the same command: it redoes only the failed queries")
    return summary


def _delta(now: dict[str, Any], before: dict[str, Any] | None) -> dict[str, Any]:
    """This run's share of an endpoint's counters (a teacher object may serve several runs)."""
    if before is None:
        return now
    return {
        "requests": now["requests"] - before["requests"],
        "retries": now["retries"] - before["retries"],
        "http_status": {k: v - before["http_status"].get(k, 0) for k, v in now["http_status"].items()
                        if v - before["http_status"].get(k, 0)},
        "rate_limit_wait_s": round(now["rate_limit_wait_s"] - before["rate_limit_wait_s"], 3),
    }


async def _run_work(work: list[Query], pipe: PersonaCoT, store: ShardStore, cfg: PipelineConfig, teacher: Teacher,
                    summary: RunSummary, progress: ProgressFn | None) -> None:
    it = iter(work)
    consecutive = 0
    fatal: list[BaseException] = []

    def reject(q: Query, rej: Rejection, ctx: QueryTrace | None) -> None:
        nonlocal consecutive
        store.write_reject(_reject_line(q, q.id, rej, cfg, teacher, ctx))
        summary.rejected += 1
        summary.reasons[rej.reason] += 1
        consecutive = consecutive + 1 if rej.reason in ENDPOINT_REJECTS else 0
        if consecutive >= cfg.max_consecutive_errors and not fatal:
            fatal.append(TeacherError(
                f"{consecutive} queries in a row failed at the endpoint; last: {rej.reason}: {rej.detail}. Stopping; "
                f"rerun the same command once the teacher is back (it redoes only the failed queries)"))

    async def worker() -> None:
        nonlocal consecutive
        for q in it:  # shared iterator: each worker pulls the next query
            if fatal:
                return
            try:
                rec = await pipe.run(q)
            except Rejection as rej:
                reject(q, rej, rej.ctx)
            except TeacherError as e:
                fatal.append(e)
                return
            except Exception as e:  # noqa: BLE001 - teacher output must never crash a run
                reject(q, Rejection(UNPARSEABLE, f"{type(e).__name__}: {e}"[:500]), None)
            else:
                store.write_record(rec)
                summary.records += 1
                consecutive = 0
            if progress:
                progress(summary)

    await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, max(1, len(work))))))
    if fatal:
        raise fatal[0]
