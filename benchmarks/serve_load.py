"""Load test for ``personafuse serve`` on loopback: many concurrent clients with mixed personas.

Starts the server in its own process (unless ``--url`` points at a running one), measures one
client at a time, then N concurrent clients, checks every reply is complete and that only the
documented 429s occurred, and reads the batch-size histogram from /metrics.

    PYTHONPATH=src python benchmarks/serve_load.py --model default --clients 64 --requests 2 \
        --max-tokens 32 --sequential 8 --max-batch 16

Bounded: every client sends a fixed number of requests and the whole run stops at --time-limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import httpx

PERSONAS: list[dict[str, Any] | None] = [
    None,
    {"mode": "pole", "pole": "high_A"},
    {"mode": "fixed", "weights": {"high_C": 0.7, "low_N": 0.3}},
    {"mode": "top_k", "k": 2},
    {"mode": "random", "k": 2},
    {"mode": "blend", "alpha": 0.5, "weights": {"high_O": 1}},
    {"mode": "pole", "pole": "low_N"},
    {"mode": "fixed", "weights": [1] * 10},
]
PROMPTS = [
    "I can't sleep, my exam is tomorrow and I feel sick with worry.",
    "Solve for x: 3x + 7 = 22. Show the steps.",
    "Brainstorm five names for a bakery that also sells books.",
    "My package is two weeks late and nobody answers my emails.",
    "My friend forgot my birthday again. Should I say something?",
    "Write a short poem about the sea at night.",
]


async def one_request(
    client: httpx.AsyncClient, i: int, max_tokens: int, stream: bool, retries: int = 20
) -> dict[str, Any]:
    """One chat completion; retries 429s (the documented back-pressure) a bounded number of times."""
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    persona = PERSONAS[i % len(PERSONAS)]
    if persona is not None:
        body["persona"] = persona
    n429 = 0
    t0 = time.perf_counter()
    for _ in range(retries + 1):
        if not stream:
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code == 429:
                n429 += 1
                await asyncio.sleep(float(r.headers.get("retry-after", 1)))
                continue
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}: {r.text[:200]}", "n429": n429}
            d = r.json()
            ch = d["choices"][0]
            ok = ch["finish_reason"] in ("stop", "length") and len(d["persona"]["weights"]) == 10
            return {"ok": ok, "tokens": d["usage"]["completion_tokens"], "n429": n429, "s": time.perf_counter() - t0,
                    "error": None if ok else f"incomplete: {d}"}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code == 429:
                await r.aread()
                n429 += 1
                await asyncio.sleep(float(r.headers.get("retry-after", 1)))
                continue
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}", "n429": n429}
            finish, done, weights, n_chunks = None, False, None, 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    return {"ok": False, "error": obj["error"]["message"], "n429": n429}
                n_chunks += 1
                weights = obj.get("persona", {}).get("weights", weights)
                if obj["choices"] and obj["choices"][0]["finish_reason"]:
                    finish = obj["choices"][0]["finish_reason"]
            ok = done and finish in ("stop", "length") and weights is not None and len(weights) == 10
            # Content chunks ≈ tokens (a few tokens may share a chunk); exact counts come from /metrics.
            return {"ok": ok, "tokens": max(n_chunks - 2, 0), "n429": n429, "s": time.perf_counter() - t0,
                    "error": None if ok else f"incomplete stream (finish={finish}, done={done})"}
    return {"ok": False, "error": f"still 429 after {retries} retries", "n429": n429}


def scrape(text: str) -> dict[str, float]:
    def val(pattern: str) -> float:
        m = re.search(pattern, text, re.M)
        return float(m.group(1)) if m else 0.0

    out = {
        "completion_tokens": val(r"^personafuse_completion_tokens_total (\S+)"),
        # decoding steps and the rows each ran (both schedulers step; "batch" = rows per step)
        "batches": val(r"^personafuse_step_batch_size_count (\S+)"),
        "batched_requests": val(r"^personafuse_step_batch_size_sum (\S+)"),
    }
    for le in ("1", "2", "4", "8", "16", "32", "64"):
        out[f"batch_le_{le}"] = val(rf'^personafuse_step_batch_size_bucket\{{le="{le}"\}} (\S+)')
    return out


async def run_load(
    url: str,
    *,
    clients: int,
    requests_per_client: int,
    max_tokens: int,
    time_limit: float,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """N clients, each sending ``requests_per_client`` requests back to back (half of them streamed)."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=time_limit, limits=limits, headers=headers) as client:
        before = scrape((await client.get("/metrics")).text)
        t0 = time.perf_counter()

        async def worker(c: int) -> list[dict[str, Any]]:
            out = []
            for j in range(requests_per_client):
                i = c * requests_per_client + j
                out.append(await one_request(client, i, max_tokens, stream=(i % 2 == 1)))
            return out

        results = await asyncio.wait_for(asyncio.gather(*(worker(c) for c in range(clients))), time_limit)
        wall = time.perf_counter() - t0
        after = scrape((await client.get("/metrics")).text)
    flat = [r for rs in results for r in rs]
    delta = {k: after[k] - before[k] for k in after}
    return {
        "clients": clients,
        "requests": len(flat),
        "ok": sum(r["ok"] for r in flat),
        "errors": [r["error"] for r in flat if not r["ok"]],
        "retried_429": sum(r["n429"] for r in flat),
        "wall_s": wall,
        "requests_per_s": len(flat) / wall,
        "completion_tokens": delta["completion_tokens"],
        "tokens_per_s": delta["completion_tokens"] / wall,
        "batches": delta["batches"],
        "mean_batch": delta["batched_requests"] / max(delta["batches"], 1),
        "batches_over_1": delta["batches"] - delta["batch_le_1"],
        "median_latency_s": sorted(r.get("s", 0.0) for r in flat)[len(flat) // 2],
    }


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "personafuse.cli", "serve", "--model", args.model, "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue), "--temperature", "0",
           "--max-tokens-limit", str(max(args.max_tokens, 16))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("server did not become healthy in 180 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="use a running server instead of starting one")
    ap.add_argument("--model", default="default")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2, help="requests per concurrent client")
    ap.add_argument("--sequential", type=int, default=8, help="requests for the one-at-a-time baseline")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--time-limit", type=float, default=600.0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    proc = None
    url = args.url
    if url is None:
        proc = start_server(args, args.port)
        url = f"http://127.0.0.1:{args.port}"
    try:
        seq = asyncio.run(run_load(url, clients=1, requests_per_client=args.sequential, max_tokens=args.max_tokens,
                                   time_limit=args.time_limit))
        conc = asyncio.run(run_load(url, clients=args.clients, requests_per_client=args.requests,
                                    max_tokens=args.max_tokens, time_limit=args.time_limit))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print("| run | requests | ok | 429 retried | wall s | req/s | completion tok/s | batches | mean batch | median latency s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in (("1 client, sequential", seq), (f"{args.clients} concurrent clients", conc)):
        print(f"| {name} | {r['requests']} | {r['ok']} | {r['retried_429']} | {r['wall_s']:.1f} | {r['requests_per_s']:.2f} "
              f"| {r['tokens_per_s']:.1f} | {r['batches']:.0f} | {r['mean_batch']:.1f} | {r['median_latency_s']:.2f} |")
    print(f"speed-up (tokens/s): {conc['tokens_per_s'] / max(seq['tokens_per_s'], 1e-9):.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sequential": seq, "concurrent": conc, "args": vars(args)}, f, indent=2)
    bad = seq["errors"] + conc["errors"]
    if bad:
        raise SystemExit(f"{len(bad)} failed requests, e.g. {bad[:3]}")


if __name__ == "__main__":
    main()
