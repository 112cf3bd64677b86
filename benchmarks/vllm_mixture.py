"""Throughput of per-request mixtures inside vLLM (the personafuse plugin) on one batch, against:

(a) the same vLLM with one static LoRA of the same rank (10r) — a fixed persona from
    ``personafuse export --routing`` — on the same prompts: the plugin's own cost per step;
(b) ``personafuse serve`` (the local engine) with the same requests and mixtures;
(c) optionally (``--stock``) a second vLLM without the plugin (``VLLM_PLUGINS=none``) and the static
    LoRA: vLLM as shipped.

Every request is greedy, sent at once (``--requests`` concurrent, each ``--max-tokens`` long,
``ignore_eos`` so every row decodes the same number of tokens), and the mixtures differ per
request (random Dirichlet weights, seeded). Prints tokens/s per system and the ratios.

CPU (this machine; starts and stops its own servers, a few minutes):

    PYTHONPATH=src .venv/bin/python benchmarks/vllm_mixture.py --model pf:CKPT --requests 8 --max-tokens 16 --repeats 2

GPU box with vLLM installed (make vllm-env; the adapters are exported here, the server started
by this script with the GPU's defaults; run on this CPU with --requests 4 --max-tokens 8
--repeats 1 --dtype float32, all four systems answered):

    PYTHONPATH=src .venv/bin/python benchmarks/vllm_mixture.py --model pf:CKPT --requests 64 \
        --max-tokens 128 --dtype bfloat16 --vllm-args "--max-num-seqs 64 --no-enable-prefix-caching" --stock \
        --json docs/results/vllm_mixture_gpu.json

``--dtype`` goes to both engines: each would otherwise take its own default (vLLM the folder's
config dtype, float32 for the embedded model's converted folder; ``personafuse serve`` bfloat16 on
a GPU), and the comparison would be float32 against bfloat16.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a short note to a friend who is nervous about starting a new job next week."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mixtures(n: int, seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        g = [rng.gammavariate(0.5, 1.0) for _ in range(10)]
        out.append([x / sum(g) for x in g])
    return out


class Server:
    """A process in its own session, killed with its children on exit."""

    def __init__(self, cmd: list[str], env: dict[str, str], url: str, log: Path) -> None:
        self.log = open(log, "w")  # noqa: SIM115 - open for the server's life
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url, self.logpath = url, log

    def wait(self, limit: float = 900) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc.args[0]} exited: {self.logpath.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"not healthy within {limit} s: {self.logpath}")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.log.close()


async def burst(url: str, bodies: list[dict[str, Any]], path: str) -> tuple[float, int]:
    """Send every body at once; (wall seconds, completion tokens)."""
    async with httpx.AsyncClient(timeout=1800) as client:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*(client.post(url + path, json=b) for b in bodies))
        wall = time.perf_counter() - t0
    for r in rs:
        r.raise_for_status()
    return wall, sum(r.json()["usage"]["completion_tokens"] for r in rs)


def vllm_bodies(ids: list[int], weights: list[list[float]] | None, adapter: str, n: int, max_tokens: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        b: dict[str, Any] = {"model": adapter, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        if weights is not None:
            b["vllm_xargs"] = {"personafuse_weights": weights[i]}
        out.append(b)
    return out


def measure(url: str, bodies: list[dict[str, Any]], path: str, repeats: int) -> float:
    asyncio.run(burst(url, bodies[:2], path))  # warm-up: first-request costs out of the timing
    best = 0.0
    for _ in range(repeats):
        wall, tokens = asyncio.run(burst(url, bodies, path))
        best = max(best, tokens / wall)
    return best


def export(model: str, out: Path, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "personafuse.cli", "export", str(out), "--model", model, *args],
                          env=env, capture_output=True, text=True, check=True)  # fmt: skip
    return proc.stdout.strip().splitlines()[-1]


def start_vllm(printed: str, modules: str, args: argparse.Namespace, work: Path, plugins: bool) -> Server:
    port = free_port()
    base = shlex.split(printed)[:-2]  # "vllm serve PATH --enable-lora --max-lora-rank R"
    cmd = [*base, "--lora-modules", *modules.split(), "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype,
           *shlex.split(args.vllm_args)]  # fmt: skip
    env = {**os.environ, "PATH": f"{ROOT / '.venv-vllm' / 'bin'}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), "PYTHONPATH": ""}  # fmt: skip
    if not plugins:
        env["VLLM_PLUGINS"] = "none"  # loads no general plugin whose name is not "none"
    return Server(cmd, env, f"http://127.0.0.1:{port}", work / f"vllm-{'plugin' if plugins else 'stock'}.log")


def run_vllm(args: argparse.Namespace, work: Path, ids: list[int], weights: list[list[float]]) -> dict[str, float]:
    printed = export(args.model, work / "stack", "--stack")
    export(args.model, work / "static", "--routing", "fixed:" + ",".join(f"{w:.6f}" for w in weights[0]))
    modules = f"personafuse={work / 'stack'} static={work / 'static'}"
    res: dict[str, float] = {}
    with start_vllm(printed, modules, args, work, plugins=True) as s:
        res["vllm_start_s"] = s.wait()
        res["plugin_mixtures"] = measure(s.url, vllm_bodies(ids, weights, "personafuse", args.requests, args.max_tokens), "/v1/completions", args.repeats)
        res["static_lora"] = measure(s.url, vllm_bodies(ids, None, "static", args.requests, args.max_tokens), "/v1/completions", args.repeats)
    if args.stock:
        with start_vllm(printed, f"static={work / 'static'}", args, work, plugins=False) as s:
            s.wait()
            res["stock_static_lora"] = measure(s.url, vllm_bodies(ids, None, "static", args.requests, args.max_tokens), "/v1/completions", args.repeats)
    return res


def run_personafuse(args: argparse.Namespace, work: Path, weights: list[list[float]]) -> float:
    from personafuse.traits import TRAIT_POLES

    port = free_port()
    cmd = [sys.executable, "-m", "personafuse.cli", "serve", "--model", args.model, "--port", str(port),
           "--max-batch", str(args.requests), "--max-tokens-limit", str(args.max_tokens), "--dtype", args.dtype]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    bodies = [{"messages": [{"role": "user", "content": PROMPT}], "max_tokens": args.max_tokens, "temperature": 0,
               "persona": {"weights": dict(zip(TRAIT_POLES, w, strict=True))}} for w in weights]  # fmt: skip
    with Server(cmd, env, f"http://127.0.0.1:{port}", work / "personafuse.log") as s:
        s.wait()
        return measure(s.url, bodies, "/v1/chat/completions", args.repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="personafuse --model spec (pf:CKPT for trained or random experts)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    # No prefix caching: every static-LoRA request shares the prompt and its cached blocks, every
    # mixture has its own cache key (by design), which would compare one prefill against eight.
    ap.add_argument("--dtype", default="float32", help="for vLLM and personafuse serve alike (bfloat16 on a GPU)")
    ap.add_argument("--vllm-args", default="--max-model-len 1024 --max-num-seqs 16 --no-enable-prefix-caching")
    ap.add_argument("--stock", action="store_true", help="also time a vLLM without the plugin (a second start)")
    ap.add_argument("--skip-personafuse", action="store_true")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    from personafuse.chat import prompt_ids
    from personafuse.chat_cli import load_model

    m = load_model(args.model)
    ids = prompt_ids(m.tokenizer, [{"role": "user", "content": PROMPT}])
    weights = mixtures(args.requests, args.seed)
    del m
    with tempfile.TemporaryDirectory(prefix="vllm-mixture-") as tmp:
        work = Path(tmp)
        res = run_vllm(args, work, ids, weights)
        if not args.skip_personafuse:
            res["personafuse_serve"] = run_personafuse(args, work, weights)
    print(f"batch of {args.requests} requests x {args.max_tokens} tokens, greedy, best of {args.repeats}; tokens/s:")
    for k in ("plugin_mixtures", "static_lora", "stock_static_lora", "personafuse_serve"):
        if k in res:
            print(f"  {k:<20} {res[k]:8.1f}   ({res[k] / res['static_lora']:.2f}x static LoRA)")
    if "personafuse_serve" in res:
        print(f"  plugin / personafuse serve: {res['plugin_mixtures'] / res['personafuse_serve']:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"requests": args.requests, "max_tokens": args.max_tokens, "repeats": args.repeats, "dtype": args.dtype}
        args.json.write_text(json.dumps({**meta, **res}, indent=2) + "\n")


if __name__ == "__main__":
    main()
