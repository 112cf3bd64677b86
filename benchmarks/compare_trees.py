"""The same benchmarks against two source trees in one run, interleaved: is the new code slower?

Each benchmark script runs in its own subprocess with ``PYTHONPATH=<tree>/src``, once per tree per
round, the order alternating (old new, new old, old new, ...) so that drift in machine load hits
both trees alike. Each round gives a paired ratio new/old per metric (throughputs: >1 is faster;
latencies and wall times are inverted so that >1 always means the new tree is faster); the table
shows the median ratio and its spread (min-max over rounds).

    python benchmarks/compare_trees.py --old /tmp/meas --new . --rounds 3 \\
        --json docs/results/refactor_parity_cpu.json
    python benchmarks/compare_trees.py --old /tmp/meas --new . --preset smoke --rounds 1   # a quick check

By default the NEW tree's benchmark scripts run against both trees (the same measuring code);
a benchmark whose script fails on the old tree with an import, attribute or type error falls back to
each tree's own script, and the JSON says so (``script``). ``--own-scripts`` forces that.

Scripts that put ``<script dir>/../src`` on ``sys.path`` themselves (mixture_throughput.py,
stage_throughput.py) still import the intended tree: each tree's scripts are run from a staging
copy whose ``src`` is a link to that tree's ``src``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Metric = tuple[str, Callable[[dict[str, Any]], float], bool]  # name, extractor, higher is better


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


@dataclass
class Bench:
    script: str
    args: dict[str, list[str]]  # per preset; "{json}" and "{port}" are filled in per run
    metrics: list[Metric] = field(default_factory=list)
    # (find, replace) edits to the OLD tree's own copy of the script, where it fails on its own tree
    old_script_fixes: list[tuple[str, str]] = field(default_factory=list)


def _mixture_metrics() -> list[Metric]:
    out: list[Metric] = []
    for v in ("base", "moe", "moe_packed"):
        out.append((f"{v} tok/s", lambda r, v=v: r["tokens_per_s"][v], True))
    for v in ("moe", "moe_packed"):
        out.append((f"{v} / base (same run)", lambda r, v=v: r["ratios"][f"{v}_vs_base"], True))
    return out


def _stage_metrics() -> list[Metric]:
    return [(f"{s} tok/s", lambda r, s=s: r["stages"][s]["tokens_per_s"], True) for s in ("warmup", "router", "joint")]


MIXTURE_SMOKE = ["--shape", "tiny", "--variants", "base,moe,moe_packed", "--batch", "2", "--prompt-len", "8", "--new-tokens", "4",
                 "--repeats", "1", "--json", "{json}"]  # fmt: skip
MIXTURE_FULL = ["--variants", "base,moe,moe_packed", "--batch", "4", "--prompt-len", "16", "--new-tokens", "16",
                "--repeats", "3", "--json", "{json}"]  # fmt: skip
STAGE_COMMON = ["--shape", "tiny", "--encoder-shape", "tiny", "--device", "cpu", "--dtype", "float32",
                "--json", "{json}"]  # fmt: skip
SERVE_COMMON = ["--model", "default", "--threads", "2", "--open-requests", "0", "--port", "{port}",
                "--scheduler", "step", "--json", "{json}"]  # fmt: skip

BENCHES: dict[str, Bench] = {
    # Persona-MoE greedy decoding on the embedded SmolLM2-135M: plain and packed mixture layers.
    "mixture": Bench("mixture_throughput.py", {"smoke": MIXTURE_SMOKE, "full": MIXTURE_FULL}, _mixture_metrics()),
    # The same through personafuse's own decoding loop (moe/decoding.py) instead of transformers' generate.
    "mixture_pf": Bench(
        "mixture_throughput.py",
        {"smoke": [*MIXTURE_SMOKE, "--decoder", "personafuse"], "full": [*MIXTURE_FULL, "--decoder", "personafuse"]},
        _mixture_metrics(),
    ),
    # One optimiser step of each training stage's objective, tiny random shapes, fp32 on CPU.
    "stage": Bench(
        "stage_throughput.py",
        {
            "smoke": [*STAGE_COMMON, "--batch", "4", "--seq", "32", "--query-len", "8", "--router-batch", "8",
                      "--steps", "1"],
            "full": [*STAGE_COMMON, "--batch", "8", "--seq", "64", "--query-len", "16", "--router-batch", "16",
                     "--steps", "6"],
        },  # fmt: skip
        _stage_metrics(),
        # f474583's own script predates router_loss returning (loss, parts): it adds the dict of parts
        # to the loss at the router and joint stages (TypeError); commit 74cc01e says so too.
        [
            ("lc, lt = obj(q_ids[:rb], q_mask[:rb], p[:rb])\n                (lc + lt).backward()",
             "lc, _ = obj(q_ids[:rb], q_mask[:rb], p[:rb])\n                lc.backward()"),
            ("+ 0.2 * (lc + lt) * (sl.stop - s) / B", "+ 0.2 * lc * (sl.stop - s) / B"),
        ],  # fmt: skip
    ),
    # personafuse serve on loopback (embedded SmolLM2): idle single stream and a small closed loop.
    "serve": Bench(
        "serve_load.py",
        {
            "smoke": [*SERVE_COMMON, "--clients", "2", "--requests", "1", "--sequential", "2", "--max-tokens", "4"],
            "full": [*SERVE_COMMON, "--clients", "8", "--requests", "2", "--sequential", "4", "--max-tokens", "16"],
        },
        [
            ("closed-loop tok/s", lambda r: r["servers"]["step"]["closed"]["tokens_per_s"], True),
            ("closed-loop latency p50 s", lambda r: r["servers"]["step"]["closed"]["latency_p50_s"], False),
            ("1 stream tok/s", lambda r: r["servers"]["step"]["idle"]["stream_tokens_per_s"], True),
            ("idle TTFT p50 s", lambda r: r["servers"]["step"]["idle"]["ttft_p50_s"], False),
        ],
    ),
    # The Persona-CoT data pipeline against the stub teacher, beside bare openai calls.
    "datagen": Bench(
        "datagen_overhead.py",
        {
            "smoke": ["--queries", "32", "--in-flight", "16", "--latency", "0.02", "--repeats", "1", "--json", "{json}"],
            "full": ["--queries", "320", "--in-flight", "32", "--latency", "0.05", "--repeats", "3", "--json", "{json}"],
        },
        [
            ("pipeline req/s", lambda r: r["pipeline_median_rps"], True),
            ("bare openai req/s", lambda r: r["bare_median_rps"], True),
            ("pipeline / bare (same run)", lambda r: _ratio(r["pipeline_median_rps"], r["bare_median_rps"]), True),
        ],
    ),
}
DEFAULT_BENCHES = "mixture,stage,serve,datagen,mixture_pf"  # most telling first
# an API the new script uses that the old tree lacks (or calls differently)
FALLBACK_ERRORS = ("ImportError", "ModuleNotFoundError", "AttributeError", "TypeError", "unrecognized arguments")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git_info(tree: Path) -> dict[str, Any]:
    """The tree's commit and whether src/ or benchmarks/ differ from it (uncommitted work)."""

    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(tree), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    dirty = git("status", "--porcelain", "--", "src", "benchmarks").splitlines()
    return {"path": str(tree), "commit": git("rev-parse", "HEAD") or None,
            "subject": git("log", "-1", "--format=%s")[:120], "uncommitted_files": len(dirty)}  # fmt: skip


def stage_tree(stage: Path, label: str, src_tree: Path, script_tree: Path) -> Path:
    """A directory with ``benchmarks/`` (a snapshot of script_tree's), ``src`` -> src_tree/src and
    src_tree's stub teacher ``tests/stub_teacher.py`` where it has one (an older tree has it as the
    module personafuse.data.stub_server in its src, which datagen_overhead.py falls back to)."""
    d = stage / label
    d.mkdir(parents=True)
    (d / "src").symlink_to((src_tree / "src").resolve(), target_is_directory=True)
    shutil.copytree(script_tree / "benchmarks", d / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    stub = src_tree / "tests" / "stub_teacher.py"
    if stub.is_file():
        (d / "tests").mkdir()
        shutil.copy2(stub, d / "tests" / stub.name)
    return d


def check_import(python: str, tree: Path) -> str:
    """Where ``personafuse`` comes from with PYTHONPATH=<tree>/src (must be that tree)."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    r = subprocess.run([python, "-c", "import personafuse, os; print(os.path.realpath(personafuse.__file__))"],
                       env=env, capture_output=True, text=True, check=True)  # fmt: skip
    where = r.stdout.strip()
    if not where.startswith(str((tree / "src").resolve())):
        raise SystemExit(f"PYTHONPATH={tree}/src imports personafuse from {where}, not from that tree")
    return where


def run_group(cmd: list[str], env: dict[str, str], cwd: str, timeout: float) -> tuple[int, str]:
    """Run ``cmd`` in its own process group; on timeout (or our own interruption) the whole group
    is killed, so a server or stub the benchmark started does not outlive it."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return 124, f"timed out after {timeout:.0f} s\n{out}"
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def run_once(python: str, tree: Path, staged: Path, bench: Bench, preset: str, timeout: float) -> dict[str, Any]:
    """One subprocess run of one benchmark against one tree: its metrics, wall time and exit."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        port = str(free_port())
        argv = [a.replace("{json}", str(out)).replace("{port}", port) for a in bench.args[preset]]
        env = {**os.environ, "PYTHONPATH": str(tree / "src"), "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
        cmd = [python, str(staged / "benchmarks" / bench.script), *argv]
        t = time.perf_counter()
        rc, log = run_group(cmd, env, tmp, timeout)
        wall = time.perf_counter() - t
        result: dict[str, Any] = {"rc": rc, "wall_s": wall}
        if rc != 0 or not out.is_file():
            result["error"] = log[-2000:]
            return result
        raw = json.loads(out.read_text())
    metrics = {}
    for name, fn, _ in bench.metrics:
        try:
            metrics[name] = float(fn(raw))
        except (KeyError, TypeError, ZeroDivisionError) as e:
            metrics[name] = float("nan")
            result.setdefault("metric_errors", []).append(f"{name}: {e!r}")
    metrics["process wall s"] = wall
    result["metrics"] = metrics
    return result


def summarise(runs: list[dict[str, Any]], bench: Bench) -> dict[str, Any]:
    """Per metric: both trees' medians and the paired ratios (>1: the new tree is faster)."""
    better = {name: hib for name, _, hib in bench.metrics} | {"process wall s": False}
    out = {}
    for name, hib in better.items():
        olds, news, ratios = [], [], []
        for rnd in runs:
            o, n = (rnd[k].get("metrics", {}).get(name, float("nan")) for k in ("old", "new"))
            olds += [o] if o == o else []
            news += [n] if n == n else []
            if o == o and n == n and o > 0 and n > 0:
                ratios.append(n / o if hib else o / n)
        med = statistics.median(ratios) if ratios else None
        out[name] = {
            "higher_is_better": hib,
            "old_median": statistics.median(olds) if olds else None,
            "new_median": statistics.median(news) if news else None,
            "new_vs_old_ratios": ratios,  # oriented: >1 means the new tree is faster
            "median_ratio": med,
            "min_ratio": min(ratios) if ratios else None,
            "max_ratio": max(ratios) if ratios else None,
            "verdict": verdict(ratios),
        }
    return out


def verdict(ratios: list[float], margin: float = 0.03) -> str:
    """'slower'/'faster' only when every round agrees and the median is past the margin; else noise."""
    if len(ratios) < 2:
        return "one round" if ratios else "no data"
    med = statistics.median(ratios)
    if max(ratios) < 1 and med < 1 - margin:
        return "slower"
    if min(ratios) > 1 and med > 1 + margin:
        return "faster"
    return "noise"


@dataclass
class Ctx:
    python: str
    old: Path
    new: Path
    stage: Path
    preset: str
    timeout: float
    own_scripts: bool
    staged: dict[str, Path] = field(default_factory=dict)

    def staged_dir(self, label: str, scripts: str) -> Path:
        """The staging copy for one tree with the new tree's or its own scripts (made on first use)."""
        tree = self.old if label == "old" else self.new
        script_tree = self.new if scripts == "new" else tree
        key = f"{label}-{scripts}-scripts"
        if key not in self.staged:
            self.staged[key] = stage_tree(self.stage, key, tree, script_tree)
        return self.staged[key]

    def fixed_old_script(self, bench: Bench) -> list[str]:
        """Apply ``bench.old_script_fixes`` to the old tree's own staged script; the edits made."""
        f = self.staged_dir("old", "own") / "benchmarks" / bench.script
        text, done = f.read_text(), []
        for find, replace in bench.old_script_fixes:
            if find in text:
                text = text.replace(find, replace)
                done.append(f"{find!r} -> {replace!r}")
        f.write_text(text)
        return done


def run_bench(name: str, bench: Bench, ctx: Ctx, rounds: int) -> dict[str, Any]:
    """``rounds`` interleaved pairs of runs (order alternating), with the old tree's script fallback."""
    scripts = {"old": "own" if ctx.own_scripts else "new", "new": "new"}
    fallback_reason, fixes = None, ctx.fixed_old_script(bench) if ctx.own_scripts else []
    runs: list[dict[str, Any]] = []
    for i in range(rounds):
        rnd: dict[str, Any] = {"order": ["old", "new"] if i % 2 == 0 else ["new", "old"]}
        for label in rnd["order"]:
            tree = ctx.old if label == "old" else ctx.new
            res = run_once(ctx.python, tree, ctx.staged_dir(label, scripts[label]), bench, ctx.preset, ctx.timeout)
            err = res.get("error", "")
            if label == "old" and scripts["old"] == "new" and any(e in err for e in FALLBACK_ERRORS):
                fallback_reason = err.strip().splitlines()[-1][:300]
                print(f"  {name}: the new script fails on the old tree ({fallback_reason}); "
                      "using each tree's own script", flush=True)  # fmt: skip
                scripts["old"] = "own"
                fixes = ctx.fixed_old_script(bench)
                for fix in fixes:
                    print(f"  {name}: the old tree's own script edited: {fix}", flush=True)
                res = run_once(ctx.python, tree, ctx.staged_dir("old", "own"), bench, ctx.preset, ctx.timeout)
            res["script"] = scripts[label]
            rnd[label] = res
            shown = f"failed (rc {res['rc']})" if "metrics" not in res else f"{res['wall_s']:.1f} s"
            print(f"  {name} round {i + 1}/{rounds} {label}: {shown}", flush=True)
            if "metrics" not in res:
                print("    " + res.get("error", "").strip().replace("\n", "\n    ")[-1500:], flush=True)
        runs.append(rnd)
    return {
        "script": bench.script,
        "args": bench.args[ctx.preset],
        "scripts_used": scripts,
        "fallback_reason": fallback_reason,
        "old_script_fixes": fixes,
        "summary": summarise(runs, bench),
        "runs": runs,
    }


def fmt(x: float | None, spec: str = ".3g") -> str:
    return "–" if x is None else format(x, spec)


def print_table(results: dict[str, Any]) -> list[str]:
    lines = ["| benchmark | metric | old (median) | new (median) | new/old | spread (min–max) | rounds | verdict |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for bname, b in results.items():
        for metric, s in b["summary"].items():
            lines.append(
                f"| {bname} | {metric} | {fmt(s['old_median'])} | {fmt(s['new_median'])} | "
                f"{fmt(s['median_ratio'], '.3f')} | {fmt(s['min_ratio'], '.3f')}–{fmt(s['max_ratio'], '.3f')} | "
                f"{len(s['new_vs_old_ratios'])} | {s['verdict']} |"
            )
    print("\n".join(lines))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, required=True, help="the reference tree (holds src/)")
    ap.add_argument("--new", type=Path, default=Path(__file__).resolve().parents[1], help="the tree under test")
    ap.add_argument("--benchmarks", default=DEFAULT_BENCHES, help=f"comma-separated, of: {', '.join(BENCHES)}")
    ap.add_argument("--rounds", type=int, default=3, help="old/new pairs per benchmark")
    ap.add_argument("--preset", choices=["smoke", "full"], default="full", help="smoke: smallest sizes")
    ap.add_argument("--own-scripts", action="store_true", help="each tree runs its own benchmark scripts")
    ap.add_argument("--run-timeout", type=float, default=600.0, help="seconds per benchmark run")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    names = [n.strip() for n in args.benchmarks.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"--benchmarks: unknown {', '.join(unknown)} (known: {', '.join(BENCHES)})")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    old, new = args.old.resolve(), args.new.resolve()
    # SIGTERM (timeout, kill) as an exception, so the running benchmark's process group goes with us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for tree in (old, new):
        if not (tree / "src" / "personafuse").is_dir() or not (tree / "benchmarks").is_dir():
            ap.error(f"{tree} has no src/personafuse or benchmarks/ (is it a checkout?)")
    record: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "load_average_before": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "trees": {"old": git_info(old), "new": git_info(new)},
        "preset": args.preset,
        "rounds": args.rounds,
        "ratio_orientation": "new vs old, >1 means the new tree is faster (latencies and wall times inverted)",
    }
    for label, tree in (("old", old), ("new", new)):
        record["trees"][label]["personafuse_imported_from"] = check_import(args.python, tree)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="compare_trees_") as stage:
        ctx = Ctx(args.python, old, new, Path(stage), args.preset, args.run_timeout, args.own_scripts)
        for name in names:
            print(f"{name}: {BENCHES[name].script} {' '.join(BENCHES[name].args[args.preset])}", flush=True)
            results[name] = run_bench(name, BENCHES[name], ctx, args.rounds)
            if args.json:  # a run cut short keeps the benchmarks done so far
                write_json(args.json, {**record, "benchmarks": results, "complete": False})
    record["load_average_after"] = os.getloadavg()
    print(f"\nold {record['trees']['old']['commit']}  new {record['trees']['new']['commit']} "
          f"(+{record['trees']['new']['uncommitted_files']} uncommitted files)  load before "
          f"{record['load_average_before'][0]:.2f}, after {record['load_average_after'][0]:.2f}")  # fmt: skip
    record["table"] = print_table(results)
    if args.json:
        write_json(args.json, {**record, "benchmarks": results, "complete": True})
        print(f"wrote {args.json}")


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False, default=str) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
