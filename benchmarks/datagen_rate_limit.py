"""Data generation under a rate limit, in real time (issue 28).

The stub teacher on loopback admits 5 requests per second (token bucket) and answers the rest
429 with a ``Retry-After``; 40 seed queries x 3 requests with the CLI's defaults for an HTTP
teacher (32 in flight, --max-retries 5, --backoff 1). The ideal is 120 / 5 = 24 s (23 s with the
bucket's first second of burst). Prints, per Retry-After value, the wall time, its ratio to 24 s,
records kept and what the endpoint saw.

    python benchmarks/datagen_rate_limit.py [--retry-after 1 0] [--queries 40] [--rate 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from personafuse.data.config import PipelineConfig
from personafuse.data.run import generate
from personafuse.data.sources import seed_queries
from personafuse.data.store import ShardStore
from personafuse.data.teachers import OpenAITeacher

# the stub teacher is a test stand-in that lives in tests/, not in the package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from stub_teacher import Faults, StubServer  # noqa: E402


def one(retry_after: str, n: int, rate: float) -> dict[str, object]:
    queries = seed_queries()[:n]
    with StubServer(faults=Faults(rate_limit=rate, retry_after=retry_after)) as server, \
            tempfile.TemporaryDirectory() as tmp:
        teacher = OpenAITeacher("stub", base_url=server.base_url)

        async def go() -> dict[str, object]:
            try:
                with ShardStore(Path(tmp)) as st:
                    return (await generate(queries, teacher, st, PipelineConfig())).as_dict()
            finally:
                await teacher.aclose()

        t0 = time.perf_counter()
        s = asyncio.run(go())
        took = time.perf_counter() - t0
    ideal = 3 * n / rate
    return {"retry_after": retry_after, "seconds": round(took, 2), "ideal_s": ideal, "ratio": round(took / ideal, 3),
            "records": s["records"], "rejected": s["rejected"], "endpoint": s["endpoint"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--retry-after", nargs="+", default=["1", "0"])
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--rate", type=float, default=5.0)
    a = ap.parse_args()
    rows = [one(ra, a.queries, a.rate) for ra in a.retry_after]
    for r in rows:
        e = r["endpoint"]
        print(f"Retry-After {r['retry_after']:>3}: {r['records']}/{a.queries} records in {r['seconds']:.1f} s "  # type: ignore[index]
              f"= {r['ratio']:.2f}x the ideal {r['ideal_s']:.0f} s; {e['requests']} requests, "  # type: ignore[index]
              f"HTTP {e['http_status']}, {e['rate_limit_wait_s']:.0f} s waited in total")  # type: ignore[index]
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
