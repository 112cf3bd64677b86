"""Equal footing for the trained variants (issue 30, section 3).

The paper trains Direct-FT, Human-like-FT, Persona-CoT-FT and the PersonaFuse variants on the same
queries. Each data mode rejects a different few (a Persona-CoT reply without its sections, a
refusal...), so every train cell learns from the queries *all* modes accepted: the intersection
of the data cells' record ids, written to the cell's own ``records.jsonl`` (its records, in their
order) with the ids in ``training_ids.json``. The report prints the count.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from personafuse.fileio import atomic_write

RECORDS_FILE = "records.jsonl"
IDS_FILE = "training_ids.json"


def accepted(out: Path, folder: str) -> list[dict[str, Any]]:
    """The records a data (or relabel) cell kept, a resumed record's last line winning."""
    from personafuse.data.store import RECORDS, read_all

    return read_all(out / folder, RECORDS)


def common_ids(out: Path, folders: Iterable[str]) -> list[str]:
    """The record ids every one of ``folders`` accepted, in the first folder's order."""
    lists = [[str(r["id"]) for r in accepted(out, f)] for f in folders]
    if not lists:
        return []
    keep = set(lists[0]).intersection(*map(set, lists[1:]))
    return [i for i in dict.fromkeys(lists[0]) if i in keep]


def write_training_records(out: Path, source: str, ids: list[str], folder: Path) -> int:
    """``folder/records.jsonl``: the records of ``source`` whose id is in ``ids`` (written whole),
    and ``folder/training_ids.json``. Returns the number of records."""
    wanted = set(ids)
    rows = [r for r in accepted(out, source) if str(r["id"]) in wanted]
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / RECORDS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (folder / IDS_FILE).write_text(json.dumps({"source": source, "count": len(rows), "ids": sorted(str(r["id"]) for r in rows)}) + "\n",
                                   encoding="utf-8")
    return len(rows)


def same_labels(out: Path, a: str, b: str, ids: Iterable[str]) -> bool:
    """Whether two record folders give the same activation vector ``p`` to every id in ``ids``
    (then a warm-up on either is the same warm-up: it reads only the records and ``p``)."""
    wanted = set(ids)
    pa = {str(r["id"]): r.get("p") for r in accepted(out, a) if str(r["id"]) in wanted}
    pb = {str(r["id"]): r.get("p") for r in accepted(out, b) if str(r["id"]) in wanted}
    return pa == pb


def training_ids(out: Path, train_cells: Iterable[str]) -> dict[str, list[str]]:
    """Each train cell's ids (``training_ids.json``), for the report's check that they are equal."""
    found = {}
    for name in train_cells:
        p = out / name / IDS_FILE
        if p.is_file():
            found[name] = json.loads(p.read_text(encoding="utf-8"))["ids"]
    return found
