"""One prompt format and one router input for every caller (personafuse.chat, router.router_inputs).

A prompt built one way in training and another at inference trains the model on text it never
reads; these tests hold training, generation, the server's token count, the evaluation subject and
the teachers to the same ids."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import build_tiny, make_tokenizer, synthetic_records
from personafuse import chat
from personafuse.evaluation.subjects import HFSubject
from personafuse.moe.router import router_inputs, router_text
from personafuse.training.batching import Featurizer
from personafuse.training.config import TrainConfig
from personafuse.training.records import Record, encode_record

torch.set_num_threads(1)

CONV = [
    {"role": "system", "content": "be kind"},
    {"role": "user", "content": "i am so sad about my job"},
    {"role": "assistant", "content": "i am so sorry"},
    {"role": "user", "content": "what is two plus three"},
]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


def _unpadded(enc, row: int) -> list[int]:
    ids, mask = enc["input_ids"][row].tolist(), enc["attention_mask"][row].tolist()
    return [i for i, m in zip(ids, mask, strict=True) if m]


@pytest.mark.parametrize("template", [True, False])
def test_training_generation_and_serving_read_the_same_prompt_ids(tiny, template):
    tok = copy.deepcopy(tiny.tokenizer)
    if not template:
        tok.chat_template = None
    model = copy.copy(tiny)
    model.tokenizer = tok
    queries = ["i am so anxious about my exam", "please help me solve this math problem"]
    gen = model.chat_inputs(queries)
    for b, q in enumerate(queries):
        ids, labels = encode_record(tok, q, "thanks a lot", max_length=64)
        prompt = [i for i, lab in zip(ids, labels, strict=True) if lab == -100]
        assert prompt == _unpadded(gen, b) == chat.prompt_ids(tok, q)
    # The templated prompt is the template's text; the plain one is the query as the tokenizer encodes it.
    if template:
        assert chat.prompt_text(tok, queries[0]) == tok.apply_chat_template(
            [{"role": "user", "content": queries[0]}], tokenize=False, add_generation_prompt=True
        )
    else:
        assert chat.prompt_ids(tok, queries[0]) == tok(queries[0])["input_ids"]  # its own special tokens
        assert chat.prompt_text(tok, CONV).endswith("user: what is two plus three\nassistant:")


def test_evaluation_subject_sends_what_generate_sends(tiny):
    subj = HFSubject(tiny.base_model, copy.deepcopy(tiny.tokenizer), batch_size=4, system_prompt="be brief")
    enc = subj._encode(["i am so anxious about my exam", CONV])
    assert _unpadded(enc, 0) == chat.prompt_ids(tiny.tokenizer, "i am so anxious about my exam", "be brief")
    assert _unpadded(enc, 1) == chat.prompt_ids(tiny.tokenizer, CONV)  # its own system prompt kept


def test_router_reads_the_same_tokens_in_training_and_at_inference(tiny):
    rows = synthetic_records(6)
    long_query = " ".join(["i am so worried about my exam"] * 40)  # past encoder_max_length
    records = [Record(str(i), r["query"], r["response"], tuple(r["p"]), "t") for i, r in enumerate(rows)]
    records.append(Record("long", long_query, "ok", (1,) + (0,) * 9, "t"))
    tiny.config.encoder_max_length = 24
    feats = Featurizer.for_model(records, tiny, TrainConfig())
    ks = list(range(len(records)))
    train = feats.enc_batch(ks, "cpu")
    infer = tiny.encode_queries([r.query for r in records])
    assert torch.equal(train["enc_ids"], infer["input_ids"]) and torch.equal(train["enc_mask"], infer["attention_mask"])
    # Left truncation keeps the end of the query, where the latest turn of a chat is.
    enc = router_inputs(tiny.encoder_tokenizer, [long_query], 24)
    tail = tiny.encoder_tokenizer(long_query)["input_ids"][-5:]
    assert enc["input_ids"][0].tolist()[-5:] == tail
    assert router_text(CONV) == "user: i am so sad about my job\nassistant: i am so sorry\nuser: what is two plus three"


def test_eos_ids_join_tokenizer_and_generation_config(tiny):
    tok = make_tokenizer()
    model = copy.copy(tiny.base_model)
    model.generation_config = copy.deepcopy(tiny.base_model.generation_config)
    model.generation_config.eos_token_id = [5, tok.eos_token_id, 6]
    assert chat.eos_token_ids(tok, model) == [tok.eos_token_id, 5, 6]
    model.generation_config.eos_token_id = None
    assert chat.eos_token_ids(tok, model) == [tok.eos_token_id]


def test_a_raw_prompt_is_sent_as_it_is(tiny):
    tok = tiny.tokenizer
    raw = chat.RawPrompt("what is two plus three")
    assert chat.prompt_text(tok, raw) == "what is two plus three"  # no template, no system prompt
    assert chat.prompt_text(tok, raw, system="be brief") == "what is two plus three"
    assert chat.prompt_ids(tok, raw) == tok("what is two plus three")["input_ids"]
    enc = chat.encode_prompts(tok, [raw, chat.RawPrompt("hello")])
    assert _unpadded(enc, 0) == chat.prompt_ids(tok, raw)
    with pytest.raises(ValueError, match="mixes raw prompts"):
        chat.encode_prompts(tok, [raw, "hello"])


def test_one_generation_result_type() -> None:
    """The model, the evaluation subjects and the package top level hand back one Generation."""
    import personafuse
    from personafuse import chat
    from personafuse.evaluation import subjects
    from personafuse.moe import model

    assert personafuse.Generation is chat.Generation is subjects.Generation is model.Generation
    g = chat.Generation("hi")
    assert (g.weights, g.finish_reason, g.completion_tokens) == (None, "stop", 0)
