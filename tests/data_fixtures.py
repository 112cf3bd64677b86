"""Shared fixtures for tests/data/test_data_*.py (a plain module, so it never clashes with a conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from stub_teacher import StubServer

REPO = Path(__file__).resolve().parents[1]


def stub_server() -> Iterator[StubServer]:
    """A real OpenAI-compatible HTTP server on loopback playing the teacher (wrap in a fixture)."""
    with StubServer(latency=0.0) as s:
        yield s


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("OPENAI_API_KEY", None)
    env.pop("OPENAI_BASE_URL", None)
    return env


def cli(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "personafuse.data.cli", *args], capture_output=True, text=True,
                       env=cli_env(), timeout=timeout, cwd=REPO)
    if check and r.returncode != 0:
        raise AssertionError(f"cli {args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def lines(folder: Path, kind: str) -> list[dict]:
    out = []
    for p in sorted(folder.glob(f"{kind}-*.jsonl")):
        raw = p.read_bytes()
        assert raw == b"" or raw.endswith(b"\n"), f"{p} ends with a torn line"
        out += [json.loads(line) for line in raw.splitlines()]
    return out
