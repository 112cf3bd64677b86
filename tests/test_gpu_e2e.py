"""benchmarks/gpu_e2e.sh (issue 29, item 6) on the CPU: the same path a lent GPU runs - stand-ins made
where they run, a short grid of the 8B preset with every model-loading cell on the requested device,
then the trained PersonaFuse served under benchmarks/serve_load.py --compare."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_fixtures import REPO, cli_env

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1500)
def test_gpu_e2e_runs_on_the_cpu_and_reports_each_cells_device(tmp_path: Path):
    env = cli_env()
    env.update(OUT=str(tmp_path), PY=sys.executable, OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", "benchmarks/gpu_e2e.sh", "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines() if line.startswith(("eval/", "replies/", "train/"))}
    for cell in ("train/personafuse/seed0", "eval/base/seed0", "eval/personafuse/seed0", "replies/personafuse/seed0"):
        assert rows[cell][0] == "cpu", (cell, rows.get(cell))
    assert rows["eval/personafuse/seed0"][1] == "float32"
    serve = json.loads((tmp_path / "e2e" / "serve_load.json").read_text())
    assert set(serve["servers"]) == {"step", "batch", "base_only"}
    assert "gpu_e2e on cpu:" in r.stdout
