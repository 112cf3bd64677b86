"""Pipeline overhead against bare concurrent ``openai`` calls, both hitting a local stub teacher.

The stub (``tests/stub_teacher.py``, its own process) answers every request after a fixed
latency. *bare* sends the same Persona-CoT prompts with ``AsyncOpenAI`` and a semaphore of
``--in-flight`` and does nothing with the replies; *pipeline* runs ``personafuse.data.generate``
(three dependent requests per query, parsing, validation, JSONL writes) with the same number of
requests in flight. Overhead = 1 - pipeline requests/s / bare requests/s (median of repeats).

    python benchmarks/datagen_overhead.py --queries 1600 --in-flight 32 --latency 0.1 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from personafuse.data import prompts
from personafuse.data.config import PipelineConfig
from personafuse.data.run import generate
from personafuse.data.sources import Query, seed_queries
from personafuse.data.store import ShardStore
from personafuse.data.teachers import OpenAITeacher


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the stub teacher is a test stand-in in tests/, not part of the package
STUB = Path(__file__).resolve().parent.parent / "tests" / "stub_teacher.py"


def stub_command() -> list[str]:
    """The stub from this tree's tests/; an older tree (e.g. staged by compare_trees.py without
    tests/) still has it as the module ``personafuse.data.stub_server``."""
    return [str(STUB)] if STUB.is_file() else ["-m", "personafuse.data.stub_server"]


def start_stub(latency: float) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, *stub_command(), "--port", str(port), "--latency", str(latency)])
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
        except urllib.error.HTTPError:  # 404 means it is up
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("stub server did not start")


def queries(n: int) -> list[Query]:
    seeds = seed_queries()
    return [Query(f"{seeds[i % len(seeds)].text} (variant {i})", seeds[i % len(seeds)].situation) for i in range(n)]


def request_set(qs: list[Query]) -> list[list[dict[str, str]]]:
    """The three prompts the pipeline sends for each query (with fixed step outputs)."""
    out = []
    for q in qs:
        out.append(prompts.cue_messages(q.text))
        out.append(prompts.traits_messages(q.text, "The person sounds earnest.", "A clear answer."))
        out.append(prompts.response_messages(q.text, "earnest", "clear", [("social", "high_A", "warm")]))
    return out


async def bare(url: str, reqs: list[list[dict[str, str]]], in_flight: int) -> float:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
    sem = asyncio.Semaphore(in_flight)

    async def one(m: list[dict[str, str]]) -> None:
        async with sem:
            r = await client.chat.completions.create(model="stub", messages=m, max_tokens=1024)  # type: ignore[arg-type]
            assert r.choices[0].message.content is not None

    t0 = time.perf_counter()
    await asyncio.gather(*(one(m) for m in reqs))
    dt = time.perf_counter() - t0
    await client.close()
    return len(reqs) / dt


async def pipeline(url: str, qs: list[Query], in_flight: int) -> float:
    teacher = OpenAITeacher("stub", base_url=url, max_in_flight=in_flight, max_retries=0)
    with tempfile.TemporaryDirectory() as d, ShardStore(Path(d)) as st:
        t0 = time.perf_counter()
        s = await generate(qs, teacher, st, PipelineConfig(concurrency=in_flight))
        dt = time.perf_counter() - t0
    await teacher.aclose()
    assert s.records == len(qs), s
    return 3 * len(qs) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=1600)  # small runs measure the end-of-run tail, see docs
    ap.add_argument("--in-flight", type=int, default=32)
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args()
    proc, url = start_stub(a.latency)
    try:
        qs = queries(a.queries)
        reqs = request_set(qs)
        asyncio.run(bare(url, reqs[: 3 * a.in_flight], a.in_flight))  # warm-up: connections, imports
        rb, rp = [], []
        for _ in range(a.repeats):  # interleaved so drift in machine load hits both alike
            rb.append(asyncio.run(bare(url, reqs, a.in_flight)))
            rp.append(asyncio.run(pipeline(url, qs, a.in_flight)))
    finally:
        proc.terminate()
        proc.wait()
    mb, mp = statistics.median(rb), statistics.median(rp)
    res = {
        "queries": a.queries, "requests_per_run": 3 * a.queries, "in_flight": a.in_flight, "latency_s": a.latency,
        "ideal_rps": a.in_flight / a.latency, "bare_rps": [round(x, 1) for x in rb],
        "pipeline_rps": [round(x, 1) for x in rp], "bare_median_rps": round(mb, 1),
        "pipeline_median_rps": round(mp, 1), "overhead": round(1 - mp / mb, 4),
    }
    print(json.dumps(res, indent=2))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
