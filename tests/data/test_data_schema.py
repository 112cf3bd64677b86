"""The record schema is one definition: what generation writes is what training reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from personafuse.data.schema import RECORD_KEYS, RecordError, make_record, read_record
from personafuse.training.records import load_records

DOCS = Path(__file__).resolve().parents[2] / "docs" / "data.md"


def _fields(**over):
    base = dict(
        id="abc", query="I can't sleep before exams", situation="", source="seeds", mode="persona_cot",
        cues={"social": "anxious student", "task": "advice"}, traits=["high_A", "low_N"], trait_reasons=[],
        p=[0, 0, 0, 0, 0, 0, 1, 0, 0, 1], response="Try a short wind-down routine.", rationale="",
        teacher="test", prompt_version="pcot-v1", constrained=False, timings={}, raw={},
    )
    return {**base, **over}


def test_a_written_record_is_read_back_by_training(tmp_path: Path) -> None:
    rows = [make_record(**_fields()), make_record(**_fields(id="b", mode="direct", p=None, traits=None, cues=None))]
    assert [list(r) for r in rows] == [list(RECORD_KEYS)] * 2  # every key, in the documented order
    f = tmp_path / "records-00000.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = load_records(f, require_p=False)
    assert [(r.id, r.query, r.response, r.p) for r in recs] == [
        ("abc", rows[0]["query"], rows[0]["response"], (0, 0, 0, 0, 0, 0, 1, 0, 0, 1)),
        ("b", rows[1]["query"], rows[1]["response"], None),
    ]


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"p": [0] * 10}, "all zero"),
        ({"p": [0, 2, 0, 0, 0, 0, 0, 0, 0, 1]}, r"'p'\[1\] \(low_O\) is 2"),
        ({"p": [1] * 9}, "has 9 entries"),
        ({"p": None}, r"missing field\(s\) p"),  # persona_cot records need p
        ({"response": "  "}, "'response' is empty"),
    ],
)
def test_the_writer_refuses_what_training_would_refuse(over, message) -> None:
    with pytest.raises(RecordError, match=message):
        make_record(**_fields(**over))
    with pytest.raises(RecordError, match=message):
        read_record(_fields(**over), "f.jsonl:3", require_p=True)


def test_the_writer_names_missing_and_unknown_keys() -> None:
    fields = _fields(extra=1)
    del fields["raw"]
    with pytest.raises(TypeError, match=r"missing \['raw'\], unknown \['extra'\]"):
        make_record(**fields)


def test_docs_table_lists_the_schema_keys() -> None:
    text = DOCS.read_text()
    table = text[text.index("### Record schema") :].split("\n\n", 2)[1]
    keys = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert tuple(keys) == RECORD_KEYS
