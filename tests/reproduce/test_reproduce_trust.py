"""Cache integrity of ``personafuse reproduce`` (issue 30) on a six-cell grid of tiny models:
change ``data.limit``, SIGKILL the grid while the data cell runs (its PID, then its whole process
group), rerun: every downstream cell is redone and summary.json equals a clean run's with the new
value. Killing the grid during a two-process (torchrun) training cell leaves no process behind; a
version bump marks every cell stale."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from data_fixtures import stub_server
from reproduce_support import popen, reproduce, tiny_experiment
from stub_teacher import StubServer

# queries, data/direct, train/direct_ft/seed0, eval/direct_ft/seed0, replies/direct_ft/seed0, report
GRID = {"variants": ["direct_ft"], "data": {"limit": 8, "heldout": 1}}
CELLS = ["queries", "data/direct", "train/direct_ft/seed0", "eval/direct_ft/seed0", "replies/direct_ft/seed0", "report"]


@pytest.fixture(scope="module")
def server() -> StubServer:
    yield from stub_server()


def _cell_processes(out: Path) -> list[psutil.Process]:
    """Live processes running inside the experiment folder (the cells run with cwd=OUT)."""
    found = []
    for p in psutil.process_iter(["cwd", "status"]):
        try:
            if p.info["cwd"] == str(out) and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _none_left(out: Path, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while (left := _cell_processes(out)) and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
    assert not left, [p.cmdline() for p in left]


def _kill_when(proc, ready, what: str, *, group: bool, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() - t0 < timeout, f"never reached {what}"
        time.sleep(0.02)
    if group:  # kill -9 -- -PGID: the grid's group (the cells run in sessions of their own)
        os.killpg(proc.pid, signal.SIGKILL)
    else:  # kill -9 PID: the grid alone; its cell learns of it through PR_SET_PDEATHSIG
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _summary(out: Path) -> dict:
    """summary.json without the checkout's commit (provenance only: other work may be committed
    between two runs of this test)."""
    s = json.loads((out / "report/summary.json").read_text())
    s["provenance"].pop("git_commit")
    return s


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_data_cell(out: Path):
    data = out / "data/direct"
    return lambda: (data / "inputs.json").is_file() and not (data / "done.json").exists() and any(
        "data" in " ".join(p.cmdline()) for p in _cell_processes(out))


def test_a_changed_limit_killed_in_the_data_cell_redoes_everything_downstream(server: StubServer, tmp_path: Path):
    cfg = tiny_experiment(tmp_path, server.base_url, **GRID)
    import yaml

    grid = yaml.safe_load(cfg.read_text())  # one benchmark, two items: the cells, not the items, are under test
    grid["eval"].update(benchmarks=["safetybench"], limit=2)
    cfg.write_text(yaml.safe_dump(grid))
    ref = tmp_path / "ref"  # a clean run with the new value, beside the first run with the old one
    clean = popen("--config", str(cfg), "--out", str(ref), "--set", "data.limit=6")
    out = tmp_path / "out"
    args = ("--config", str(cfg), "--out", str(out))
    r = reproduce(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert clean.wait(timeout=900) == 0, (ref / "reproduce.log").read_text()[-3000:]
    old = {c: json.loads((out / c / "done.json").read_text())["finished"] for c in CELLS}
    changed = (*args, "--set", "data.limit=6")
    _kill_when(popen(*changed), _in_data_cell(out), "the data cell", group=False)
    _none_left(out)
    # after the crash the data cell is unfinished, and every cell below it still carries old inputs
    dry = reproduce(*changed, "--dry-run").stdout
    assert "[todo ] data/direct" in dry and all(f"[stale] {c}" in dry for c in CELLS[2:])
    _kill_when(popen(*changed), _in_data_cell(out), "the data cell again", group=True)
    _none_left(out)
    r = reproduce(*changed)
    assert r.returncode == 0, r.stderr[-3000:]
    for c in CELLS:  # every cell redone under the new limit
        assert json.loads((out / c / "done.json").read_text())["finished"] != old[c], c
    assert len((out / "queries/train.jsonl").read_text().splitlines()) == 6
    assert _summary(out) == _summary(ref)

    # a new personafuse version: every cell is stale (a fixed scorer, loss or prompt reaches all)
    from personafuse.reproduce import fingerprint
    from personafuse.reproduce.config import ReproduceConfig
    from personafuse.reproduce.run import Grid

    grid = Grid(ReproduceConfig.load(cfg, ["data.limit=6"]), out)
    assert all(grid.state(c) == "done" for c in grid.cells)
    real = fingerprint.package_version
    try:
        fingerprint.package_version = lambda: real() + ".post1"  # type: ignore[assignment]
        assert all(grid.state(c) == "stale" for c in grid.cells)
        assert grid.describe().count("[stale]") == len(CELLS)
    finally:
        fingerprint.package_version = real  # type: ignore[assignment]

    # a two-process training cell (torchrun): killing the grid leaves no rank behind
    launcher = ("--set", f"train_launcher=torchrun --nproc_per_node 2 --master_port {_free_port()}")
    two = popen(*changed, *launcher, "--no-check")  # the preflight refuses two processes without two GPUs
    ranks = lambda: sum("personafuse.cli" in " ".join(p.cmdline()) for p in _cell_processes(out)) >= 3  # noqa: E731
    _kill_when(two, ranks, "two training processes", group=False)
    _none_left(out)


# ---------------------------------------------------------------------------- the fingerprint, in-process
def _grid_without_models(tmp_path: Path, source: Path):
    from eval_support import FIXTURE_BENCHDATA
    from personafuse.reproduce.config import ReproduceConfig
    from personafuse.reproduce.run import Grid

    cfg = ReproduceConfig.load(None, ["variants=[direct_ft]", "data.limit=4", "data.heldout=0", f"data.source=file:{source}",
                                      f"eval.data={FIXTURE_BENCHDATA}"])
    grid = Grid(cfg, tmp_path / "out")
    seen: dict[str, list[str]] = {}
    # no model is loaded: a spawned command only records what its folder held when it started
    grid._spawn = lambda cell, cmd: seen.setdefault(cell.name, sorted(p.name for p in (grid.out / cell.name).iterdir()))
    return grid, seen


def test_a_partial_folder_resumes_only_under_the_same_inputs_and_sources_are_identified(tmp_path: Path):
    source = tmp_path / "queries.jsonl"
    source.write_text("".join(json.dumps({"query": f"question number {i}?"}) + "\n" for i in range(6)))
    grid, seen = _grid_without_models(tmp_path, source)
    queries, data = grid.cells[0], next(c for c in grid.cells if c.name == "data/direct")
    grid._run_cell(queries)
    assert grid.state(queries) == "done" and grid.state(data) == "todo"
    folder = grid.out / data.name
    folder.mkdir(parents=True)
    (folder / "records-00000.jsonl").write_text("{}\n")  # left by a crash under other inputs
    (folder / "inputs.json").write_text(json.dumps({"command": ["old"]}))
    grid._run_cell(data)
    assert seen.pop(data.name) == ["inputs.json"]  # cleared before the command resumed it
    (folder / "done.json").unlink()
    (folder / "records-00000.jsonl").write_text("{}\n")  # a crash under the same inputs
    grid._run_cell(data)
    assert seen.pop(data.name) == ["inputs.json", "records-00000.jsonl"]  # resumed as it was
    assert grid.state(data) == "done"
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the query file changed
    assert grid.state(queries) == "stale" and grid.state(data) == "done"
    grid._run_cell(queries)  # redone: a new done.json, so what read it is stale
    assert grid.state(data) == "stale"
    done = json.loads((grid.out / "queries/done.json").read_text())
    assert done["inputs"]["sources"][0]["size"] == stat.st_size and "git_commit" in done and "config" in done
