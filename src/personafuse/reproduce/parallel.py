"""Independent cells side by side, one per device (``eval.devices``).

Evaluation and replies cells read only finished checkpoints and write only their own folder, so a
machine with N GPUs runs N of them at once, each child seeing its one GPU through
``CUDA_VISIBLE_DEVICES`` (so ``--device auto``/``cuda`` inside it means that GPU, and the command
line, which the cell's cache key holds, is the same whichever GPU ran it). ``cpu`` entries run
cells at once on the CPU with no GPU visible. Training cells are not scheduled here: they run one
at a time under the preset's ``train_launcher`` (``accelerate launch --multi_gpu ...``), which
spreads one cell over every GPU.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

SIDE_BY_SIDE = ("eval", "replies")  # cell kinds that may share the machine


def slots(devices: str | Sequence[str]) -> list[str]:
    """The devices cells are spread over: ``auto`` is every visible CUDA device (none: one slot,
    the cells' own ``eval.device``), a list is taken as given (``[cpu, cpu]``: two CPU cells)."""
    if devices != "auto":
        return [d.strip().lower() for d in devices]
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:  # no torch CUDA build: one cell at a time
        n = 0
    return [f"cuda:{i}" for i in range(n)] if n > 1 else []


def slot_env(device: str) -> dict[str, str]:
    """What a child's environment says about its device: ``cuda:N`` shows it GPU N alone (the Nth
    of the parent's own ``CUDA_VISIBLE_DEVICES`` where that is set), ``cpu`` shows it none."""
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    if device.startswith("cuda"):
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        return {"CUDA_VISIBLE_DEVICES": visible[index] if index < len(visible) else str(index)}
    return {}


def run_side_by_side(cells: Sequence[Any], devices: Sequence[str], run_one: Callable[[Any, str], None]) -> None:
    """``run_one(cell, device)`` for every cell, at most one cell per device at a time. After a
    failure no new cell starts; the running ones finish (their work is kept) and the first error
    is raised."""
    free: queue.Queue[str] = queue.Queue()
    for d in devices:
        free.put(d)

    def one(cell: Any) -> None:
        device = free.get()
        try:
            run_one(cell, device)
        finally:
            free.put(device)

    with ThreadPoolExecutor(max_workers=len(devices), thread_name_prefix="cell") as pool:
        futures: list[Future[None]] = []
        for cell in cells:
            futures.append(pool.submit(one, cell))
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f.done() and f.exception() is not None), None)
        if failed is not None:
            for f in futures:
                f.cancel()  # the queued cells; the running ones finish
    for f in futures:
        if not f.cancelled() and f.exception() is not None:
            raise f.exception()  # type: ignore[misc]
