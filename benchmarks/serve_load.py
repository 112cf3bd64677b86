"""Load test for ``personafuse serve`` on loopback: many clients with mixed personas and reply lengths.

Starts the server in its own process (unless ``--url`` points at a running one) and measures it
as clients see it: time to first token (TTFT), end-to-end latency and tokens/s, checking that
every reply is complete and that only the documented 429s occurred.

Two load shapes:

* closed loop: N clients, each sending its requests back to back (``--clients``, ``--requests``);
* open loop: requests arriving as a Poisson process at ``--rate`` per second, whatever the server
  does (``--open-requests`` of them), all streamed, so TTFT is what a user waits.

``--compare`` runs the same loads against three servers, one after the other, and prints one
table: (a) this server (``--scheduler step``), (b) the earlier run-to-completion batching
(``--scheduler batch``), (c) the base model alone under the same engine (``--base-only``: the
mixture's cost under load). It also times the model's own ``PersonaFuseModel.generate`` on one
request in this process (the single-stream reference), with the servers stopped.

    PYTHONPATH=src python benchmarks/serve_load.py --model default --compare --threads 2 \
        --clients 64 --requests 2 --rate 1 --open-requests 24 --json docs/results/serve_load.json

Bounded: every client sends a fixed number of requests and each run stops at --time-limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
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


LENGTHS = (1.0, 0.5, 0.25, 0.75)  # reply lengths, as shares of --max-tokens: short and long mixed


async def one_request(
    client: httpx.AsyncClient, i: int, max_tokens: int, stream: bool, retries: int = 20, mixed_lengths: bool = False
) -> dict[str, Any]:
    """One chat completion; retries 429s (the documented back-pressure) a bounded number of times.
    Streamed requests report their time to first token (``ttft``, from the first send)."""
    if mixed_lengths:
        max_tokens = max(1, round(max_tokens * LENGTHS[i % len(LENGTHS)]))
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}  # the exact token count, in the last chunk
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
            finish, done, weights, n_chunks, ttft, usage = None, False, None, 0, None, None
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
                usage = obj.get("usage") or usage
                if ttft is None and obj["choices"] and obj["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - t0
                weights = obj.get("persona", {}).get("weights", weights)
                if obj["choices"] and obj["choices"][0]["finish_reason"]:
                    finish = obj["choices"][0]["finish_reason"]
            ok = done and finish in ("stop", "length") and weights is not None and len(weights) == 10
            tokens = usage["completion_tokens"] if usage else max(n_chunks - 2, 0)
            return {"ok": ok, "tokens": tokens, "n429": n429, "s": time.perf_counter() - t0, "ttft": ttft,
                    "error": None if ok else f"incomplete stream (finish={finish}, done={done})"}
    return {"ok": False, "error": f"still 429 after {retries} retries", "n429": n429}


def scrape(text: str) -> dict[str, float]:
    """Counters read from /metrics with prometheus_client's parser (what the server writes them with)."""
    from prometheus_client.parser import text_string_to_metric_families

    # bucket bounds as numbers: "1" (the hand-written text before issue 33) and "1.0" are one bound
    samples = {(s.name, float(s.labels["le"]) if "le" in s.labels else None): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip

    def val(name: str, le: float | None = None) -> float:
        return float(samples.get((name, le), 0.0))

    out = {
        "completion_tokens": val("personafuse_completion_tokens_total"),
        # decoding steps and the rows each ran (both schedulers step; "batch" = rows per step)
        "batches": val("personafuse_step_batch_size_count"),
        "batched_requests": val("personafuse_step_batch_size_sum"),
    }
    for le in ("1", "2", "4", "8", "16", "32", "64"):
        out[f"batch_le_{le}"] = val("personafuse_step_batch_size_bucket", float(le))
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
        **summarise(flat, wall, delta),
        "requests_per_s": len(flat) / wall,
        "batches": delta["batches"],
        "batches_over_1": delta["batches"] - delta["batch_le_1"],
        "median_latency_s": sorted(r.get("s", 0.0) for r in flat)[len(flat) // 2],
    }


def percentile(xs: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation (numpy's default), None without data."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def summarise(flat: list[dict[str, Any]], wall: float, delta: dict[str, float]) -> dict[str, Any]:
    lat = [r["s"] for r in flat if r["ok"]]
    ttft = [r["ttft"] for r in flat if r["ok"] and r.get("ttft") is not None]
    return {
        "requests": len(flat),
        "ok": sum(r["ok"] for r in flat),
        "errors": [r["error"] for r in flat if not r["ok"]],
        "retried_429": sum(r["n429"] for r in flat),
        "wall_s": wall,
        "completion_tokens": delta["completion_tokens"],
        "client_tokens": sum(r.get("tokens", 0) for r in flat if r["ok"]),  # as the responses' usage says
        "tokens_per_s": delta["completion_tokens"] / wall,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "latency_p50_s": percentile(lat, 50),
        "latency_p95_s": percentile(lat, 95),
        "mean_batch": delta["batched_requests"] / max(delta["batches"], 1),
    }


async def open_loop(
    url: str, *, rate: float, n: int, max_tokens: int, time_limit: float, seed: int = 0, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """``n`` streamed requests arriving as a Poisson process of ``rate`` per second (exponential
    gaps, seeded), sent whether or not earlier ones are answered; mixed personas and lengths."""
    gaps = random.Random(seed)
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=time_limit, limits=limits, headers=headers) as client:
        before = scrape((await client.get("/metrics")).text)
        t0 = time.perf_counter()
        tasks, at = [], 0.0
        for i in range(n):
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            tasks.append(asyncio.create_task(one_request(client, i, max_tokens, stream=True, mixed_lengths=True)))
            at += gaps.expovariate(rate)
        flat = await asyncio.wait_for(asyncio.gather(*tasks), time_limit)
        wall = time.perf_counter() - t0
        after = scrape((await client.get("/metrics")).text)
    return {"rate": rate, **summarise(list(flat), wall, {k: after[k] - before[k] for k in after})}


def idle_stream(url: str, n: int, max_tokens: int, time_limit: float) -> dict[str, Any]:
    """``n`` streamed requests one at a time (nothing else running): the idle TTFT and the tokens
    per second of one stream (whole reply length over its latency, median)."""

    async def go() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=url, timeout=time_limit) as client:
            return [await one_request(client, i, max_tokens, stream=True) for i in range(n)]

    flat = asyncio.run(go())
    ok = [r for r in flat if r["ok"]]
    return {
        "requests": n,
        "errors": [r["error"] for r in flat if not r["ok"]],
        "ttft_p50_s": percentile([r["ttft"] for r in ok if r.get("ttft") is not None], 50),
        "stream_tokens_per_s": statistics.median(r["tokens"] / r["s"] for r in ok) if ok else None,
    }


def start_server(args: argparse.Namespace, port: int, extra: list[str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "personafuse.cli", "serve", "--model", args.model, "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue), "--temperature", "0",
           "--max-tokens-limit", str(max(args.max_tokens, 16)), *(extra or [])]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.device:  # the server's --device (benchmarks/gpu_e2e.sh: cuda)
        cmd += ["--device", args.device]
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


def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Idle single stream, open loop, closed loop: one server's row of the table."""
    out: dict[str, Any] = {"idle": idle_stream(url, args.sequential, args.max_tokens, args.time_limit)}
    if args.open_requests:
        out["open"] = asyncio.run(open_loop(url, rate=args.rate, n=args.open_requests, max_tokens=args.max_tokens,
                                            time_limit=args.time_limit))  # fmt: skip
    out["closed"] = asyncio.run(run_load(url, clients=args.clients, requests_per_client=args.requests,
                                         max_tokens=args.max_tokens, time_limit=args.time_limit))  # fmt: skip
    return out


def generate_reference(args: argparse.Namespace) -> dict[str, Any]:
    """The model's own ``generate`` on one request (greedy, --max-tokens), median of --sequential."""
    import torch

    from personafuse.specs import load_personafuse

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_personafuse(args.model, device=args.device).eval()
    rates = []
    for i in range(args.sequential):
        t = time.perf_counter()
        g = model.generate([[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]], max_new_tokens=args.max_tokens)[0]
        rates.append(g.completion_tokens / (time.perf_counter() - t))
    return {"requests": args.sequential, "tokens_per_s": statistics.median(rates[1:] or rates)}  # the first warms up


SERVERS = {"step": [], "batch": ["--scheduler", "batch"], "base_only": ["--base-only"]}


def print_table(res: dict[str, Any], args: argparse.Namespace) -> None:
    def f(x: Any, spec: str = ".2f") -> str:
        return "–" if x is None else format(x, spec)

    print(f"| server | idle TTFT s | 1 stream tok/s | open loop {args.rate:g}/s: TTFT p50 / p95 s | latency p50 / p95 s "
          f"| tok/s | {args.clients} clients: tok/s | TTFT p50 / p95 s | latency p50 / p95 s | rows/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in res["servers"].items():
        o, c, i = r.get("open", {}), r["closed"], r["idle"]
        print(f"| {name} | {f(i['ttft_p50_s'])} | {f(i['stream_tokens_per_s'], '.1f')} | {f(o.get('ttft_p50_s'))} / "
              f"{f(o.get('ttft_p95_s'))} | {f(o.get('latency_p50_s'))} / {f(o.get('latency_p95_s'))} | "
              f"{f(o.get('tokens_per_s'), '.1f')} | {f(c['tokens_per_s'], '.1f')} | {f(c['ttft_p50_s'])} / {f(c['ttft_p95_s'])} "
              f"| {f(c['latency_p50_s'])} / {f(c['latency_p95_s'])} | {f(c['mean_batch'], '.1f')} |")
    for k, v in res.get("ratios", {}).items():
        print(f"{k}: {v:.3f}")


def ratios(res: dict[str, Any]) -> dict[str, float]:
    sv, out = res["servers"], {}
    if "step" in sv and "base_only" in sv:
        out["closed-loop tok/s, step / base_only"] = sv["step"]["closed"]["tokens_per_s"] / sv["base_only"]["closed"]["tokens_per_s"]
    if "step" in sv and res.get("generate"):
        out["one stream tok/s, step / generate"] = sv["step"]["idle"]["stream_tokens_per_s"] / res["generate"]["tokens_per_s"]
    if "step" in sv and "open" in sv["step"]:
        out["open-loop TTFT p50 / idle TTFT (step)"] = sv["step"]["open"]["ttft_p50_s"] / sv["step"]["idle"]["ttft_p50_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="use a running server instead of starting one (no --compare)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--clients", type=int, default=64, help="closed loop: concurrent clients")
    ap.add_argument("--requests", type=int, default=2, help="closed loop: requests per client")
    ap.add_argument("--rate", type=float, default=1.0, help="open loop: arrivals per second (Poisson)")
    ap.add_argument("--open-requests", type=int, default=24, help="open loop: requests sent (0: skip)")
    ap.add_argument("--sequential", type=int, default=8, help="idle single-stream requests (and generate runs)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None, help="the servers' --device and the generate reference's (default: the server's own)")
    ap.add_argument("--time-limit", type=float, default=900.0)
    ap.add_argument("--compare", action="store_true", help="step vs batch vs base_only servers, and generate")
    ap.add_argument("--scheduler", default="step", help="without --compare: the server's --scheduler")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    names = list(SERVERS) if args.compare else [args.scheduler]
    res: dict[str, Any] = {"args": vars(args), "servers": {}}
    for name in names:
        proc, url = None, args.url
        if url is None:
            proc = start_server(args, args.port, SERVERS.get(name, ["--scheduler", name]))
            url = f"http://127.0.0.1:{args.port}"
        try:
            res["servers"][name] = measure(url, args)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    if args.compare:
        res["generate"] = generate_reference(args)
    res["ratios"] = ratios(res)
    print_table(res, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    bad = [e for r in res["servers"].values() for part in r.values() for e in part["errors"]]
    if bad:
        raise SystemExit(f"{len(bad)} failed requests, e.g. {bad[:3]}")


if __name__ == "__main__":
    main()
