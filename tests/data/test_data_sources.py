"""Query sources: seed set, local files with field mappings, Hub adapters on local files, bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_fixtures import cli, write_jsonl
from personafuse.data.sources import (
    HubStats,
    SourceError,
    file_queries,
    hub_queries,
    load_source,
    normalise_query,
    query_id,
    seed_queries,
)

SITUATIONS = {"emotional_support", "distress", "customer_service", "maths", "coding", "factual", "creative_writing",
              "brainstorming", "debate", "advice", "social", "workplace"}


def test_seed_set_size_spread_and_uniqueness() -> None:
    qs = seed_queries()
    assert len(qs) >= 300
    counts = Counter(q.situation for q in qs)
    assert set(counts) == SITUATIONS and min(counts.values()) >= 20
    assert len({q.id for q in qs}) == len(qs)


def test_ids_use_the_normalised_query() -> None:
    assert query_id("Hello   World ") == query_id("hello world")
    assert normalise_query("Ｆｕｌｌ\twidth") == "full width"
    assert query_id("a") != query_id("b")


def test_jsonl_csv_parquet_with_mapping(tmp_path: Path) -> None:
    rows = [{"instruction": "How do tides work?", "meta": {"cat": "factual"}}, {"instruction": "Write a poem.", "meta": {"cat": "creative"}}]
    j = write_jsonl(tmp_path / "a.jsonl", rows)
    qs = file_queries(j, {"query": "instruction", "situation": "meta.cat"})
    assert [(q.text, q.situation) for q in qs] == [("How do tides work?", "factual"), ("Write a poem.", "creative")]
    c = tmp_path / "a.csv"
    c.write_text("prompt,kind\nHow do tides work?,factual\n\"Write a poem, please.\",creative\n")
    qs = file_queries(c, {"situation": "kind"})  # query column found automatically
    assert [q.text for q in qs] == ["How do tides work?", "Write a poem, please."]
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"question": ["What is 2+2?", "Name a colour."]}), p)
    assert [q.text for q in file_queries(p)] == ["What is 2+2?", "Name a colour."]
    assert len(load_source(f"file:{j}", fields={"query": "instruction"}, limit=1)) == 1


@pytest.mark.parametrize("content,fields,message", [
    (None, {}, "a.jsonl: file not found"),
    ('{"q": "x"}\n{"q": "y"}\n', {"query": "instruction"}, r"a.jsonl:1: field 'instruction' not found .*the row has q"),
    ('{"q": "x"}\n', {}, r"a.jsonl:1: no query column found .*--field query=COLUMN"),
    ("", {}, "a.jsonl: no queries"),
    ('{"query": "fine"}\n{"query": "fine too"}\n{"query": broken\n', {}, r"a.jsonl:3: not valid JSON"),
    ('{"query": "fine"}\n[1, 2]\n', {}, r"a.jsonl:2: expected a JSON object"),
    ('{"query": "fine"}\n\n{"query": ""}\n', {}, r"a.jsonl:3: field 'query' is empty"),
    ('{"query": 42}\n', {}, r"a.jsonl:1: field 'query' is int"),
    ('{"query": "x", "s": 1}\n', {"situation": "cat"}, r"a.jsonl:1: field 'cat' not found"),
])
def test_bad_input_names_file_and_line(tmp_path: Path, content: str | None, fields: dict, message: str) -> None:
    path = tmp_path / "a.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SourceError, match=message):
        file_queries(path, fields)


def test_bad_bytes_and_bad_csv(tmp_path: Path) -> None:
    p = tmp_path / "b.jsonl"
    p.write_bytes(b'{"query": "ok"}\n{"query": "\xff\xfe"}\n')
    with pytest.raises(SourceError, match=r"b.jsonl:2: not valid UTF-8"):
        file_queries(p)
    c = tmp_path / "b.csv"
    c.write_bytes(b"query\nfine\nbad \xff byte\n")
    with pytest.raises(SourceError, match=r"b.csv:3: not valid UTF-8"):
        file_queries(c)
    c.write_text("query\nfine\n\"too\",many,cells\n")
    with pytest.raises(SourceError, match=r"b.csv:3: more cells than header"):
        file_queries(c)
    (tmp_path / "x.txt").write_text("query\n")
    with pytest.raises(SourceError, match="unknown file type"):
        file_queries(tmp_path / "x.txt")
    with pytest.raises(SourceError, match="unknown field mapping"):
        file_queries(c, {"qurey": "x"})


def test_cli_bad_input_exits_with_the_location(tmp_path: Path) -> None:
    p = tmp_path / "q.jsonl"
    p.write_text('{"query": "fine"}\n{"query": oops}\n')
    r = cli("generate", "--teacher", "openai:stub", "--base-url", "http://127.0.0.1:9/v1", "--source", f"file:{p}",
            "--out", str(tmp_path / "o"), check=False)
    assert r.returncode == 2 and f"{p}:2: not valid JSON" in r.stderr
    r = cli("generate", "--source", "nosuch:thing", "--out", str(tmp_path / "o"), check=False)
    assert r.returncode == 2 and "unknown source" in r.stderr


# ---------------------------------------------------------------------- Hub adapters on local files


def _sharegpt_rows() -> list[dict]:
    return [
        {"id": "a", "conversations": [{"from": "human", "value": "How do I learn to juggle?"}, {"from": "gpt", "value": "Start with..."}]},
        {"id": "b", "conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "Explain quantum tunnelling simply."}]},
        {"id": "c", "conversations": [{"from": "gpt", "value": "no human turn"}]},
        {"id": "d", "conversations": [{"from": "human", "value": "how do i learn to   JUGGLE?"}]},  # duplicate
        {"id": "e", "conversations": [{"from": "human", "value": "你好，请介绍一下你自己。"}]},  # not English
        {"id": "f", "conversations": [{"from": "human", "value": "hi"}]},  # too short
        {"id": "g", "conversations": [{"from": "human", "value": "x" * 5000}]},  # too long
    ]


def test_sharegpt_adapter_filters_and_dedupes(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "sharegpt.jsonl", _sharegpt_rows())
    st = HubStats()
    qs = hub_queries("sharegpt", str(p), stats=st)
    assert sorted(q.text for q in qs) == ["Explain quantum tunnelling simply.", "How do I learn to juggle?"]
    assert (st.no_user_turn, st.duplicates, st.wrong_language, st.too_short, st.too_long) == (1, 1, 1, 1, 1)
    assert [q.text for q in hub_queries("sharegpt", str(p), lang="zh")] == ["你好，请介绍一下你自己。"]
    assert len(hub_queries("sharegpt", str(p), lang=None, max_chars=10_000)) == 4  # + Chinese, + long


def test_seeded_sampling_is_reproducible(tmp_path: Path) -> None:
    rows = [{"conversations": [{"from": "human", "value": f"Question number {i} about something?"}]} for i in range(50)]
    p = write_jsonl(tmp_path / "s.jsonl", rows)
    a = [q.text for q in hub_queries("sharegpt", str(p), limit=10, seed=1)]
    b = [q.text for q in hub_queries("sharegpt", str(p), limit=10, seed=1)]
    c = [q.text for q in hub_queries("sharegpt", str(p), limit=10, seed=2)]
    assert a == b and a != c and len(set(a)) == 10


def test_wildchat_personahub_infinity_shapes(tmp_path: Path) -> None:
    wild = write_jsonl(tmp_path / "wild.jsonl", [
        {"conversation": [{"role": "user", "content": "Write an email to my landlord.", "language": "English"},
                          {"role": "assistant", "content": "Dear..."}], "language": "English", "toxic": False},
        {"conversation": [{"role": "user", "content": "Bonjour, comment ça va aujourd'hui ?"}], "language": "French", "toxic": False},
        {"conversation": [{"role": "user", "content": "something toxic here"}], "language": "English", "toxic": True},
    ])
    assert [q.text for q in hub_queries("wildchat", str(wild))] == ["Write an email to my landlord."]
    assert [q.text for q in hub_queries("wildchat", str(wild), lang="fr")] == ["Bonjour, comment ça va aujourd'hui ?"]
    ph = tmp_path / "ph.parquet"
    pq.write_table(pa.table({"input persona": ["a nurse", "a chef"],
                             "synthesized text": ["How do I stay calm on night shifts?", "Suggest a menu for ten guests."]}), ph)
    assert sorted(q.text for q in hub_queries("personahub", str(ph))) == [
        "How do I stay calm on night shifts?", "Suggest a menu for ten guests."]
    inf = write_jsonl(tmp_path / "inf.jsonl", [
        {"id": 1, "conversations": [{"from": "human", "value": "Summarise the water cycle."}], "langdetect": "en"},
        {"id": 2, "conversations": [{"from": "human", "value": "解释一下水循环。"}], "langdetect": "zh-cn"},
    ])
    assert [q.text for q in hub_queries("infinity", str(inf))] == ["Summarise the water cycle."]
    assert [q.text for q in hub_queries("infinity", str(inf), lang="zh")] == ["解释一下水循环。"]
    assert load_source(f"infinity:{inf}", limit=5)[0].source.startswith("infinity:")


def test_hub_adapter_with_nothing_usable(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "gpt", "value": "x"}]}])
    with pytest.raises(SourceError, match=r"no usable queries \(1 rows read: 1 without a user turn"):
        hub_queries("sharegpt", str(p))


def test_conversation_stored_as_json_string(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "s.jsonl", [{"conversations": json.dumps([{"from": "human", "value": "Stringified turn here?"}])}])
    assert hub_queries("sharegpt", str(p))[0].text == "Stringified turn here?"


def test_folder_goes_through_datasets_streaming(tmp_path: Path) -> None:
    """A local folder (like a downloaded Hub snapshot) takes the same streaming path as a Hub id."""
    d = tmp_path / "snapshot"
    d.mkdir()
    write_jsonl(d / "train.jsonl", _sharegpt_rows())
    st = HubStats()
    qs = hub_queries("sharegpt", str(d), stats=st, seed=0)
    assert sorted(normalise_query(q.text) for q in qs) == ["explain quantum tunnelling simply.", "how do i learn to juggle?"]
    assert st.seen == 7 and st.duplicates == 1
