"""The one backend layer (issue 33, item 5): specs map to backends whose capabilities callers ask,
and teachers, subjects and judges send their requests through the same OpenAI-compatible backend
under the same retry policy (real loopback servers: the stub teacher and the eval ChatServer)."""

from __future__ import annotations

import asyncio

import pytest

from eval_support import ChatServer
from personafuse.backends import (
    HF,
    OPENAI,
    VLLM,
    BackendError,
    model_backend,
    teacher_backend,
    teacher_capabilities,
)
from personafuse.backends.openai_compat import OpenAIBackend
from personafuse.chat import RawPrompt
from personafuse.data.cli import runs_here
from personafuse.data.teachers import GenParams, OpenAITeacher, TeacherRequestError
from personafuse.evaluation.subjects import OpenAISubject
from stub_teacher import StubServer

MSGS = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize(("spec", "kind", "target", "caps"), [
    ("default", "hf", "default", HF), ("hf:org/model", "hf", "org/model", HF),
    ("openai:gpt-x", "openai", "gpt-x", OPENAI), ("vllm:org/model", "vllm", "org/model", VLLM)])
def test_teacher_specs_name_a_backend_and_its_capabilities(spec: str, kind: str, target: str, caps: object) -> None:
    b = teacher_backend(spec)
    assert (b.kind, b.target, b.capabilities) == (kind, target, caps)
    assert runs_here(spec) == (kind == "hf")  # --device/--dtype/--batch-size reach only a model in this process


@pytest.mark.parametrize("spec", ["gpt4", "hf:", "openai:", "stub:x"])
def test_an_unknown_teacher_is_named_and_can_do_nothing(spec: str) -> None:
    with pytest.raises(BackendError, match=f"unknown teacher '{spec}'; use default, hf:ID_OR_PATH"):
        teacher_backend(spec)
    caps = teacher_capabilities(spec)
    assert not (caps.placement or caps.endpoint or caps.scoring or caps.chat) and not runs_here(spec)


def test_model_specs_run_on_hf_or_openai() -> None:
    assert model_backend("openai:judge-x").kind == "openai" and model_backend("openai:judge-x").target == "judge-x"
    for spec in ("default", "base", "hf:org/m", "lora:/tmp/a", "pf:/tmp/ckpt", "org/m"):
        assert model_backend(spec).capabilities is HF, spec
    with pytest.raises(ValueError, match="nothing after 'openai:'"):
        model_backend("openai:")


def test_capabilities_tell_what_each_backend_can_do() -> None:
    assert HF.scoring and HF.placement and not HF.endpoint
    assert OPENAI.endpoint and not OPENAI.scoring and not OPENAI.placement and OPENAI.completion
    assert not VLLM.placement and not VLLM.endpoint and VLLM.batching
    assert OpenAITeacher("m", base_url="http://127.0.0.1:9/v1").capabilities is OPENAI
    assert OpenAISubject("m", base_url="http://127.0.0.1:9/v1").capabilities is OPENAI


def test_teacher_subject_and_judge_send_their_requests_through_one_backend() -> None:
    """The bodies each sends, as before the merge: a teacher's chat carries top_p, a subject's its
    seed, a raw prompt goes to /completions; extra body fields (vLLM's vllm_xargs) ride along."""
    with ChatServer(lambda messages, body: "fine") as srv:
        teacher = OpenAITeacher("t", base_url=srv.base_url)
        subject = OpenAISubject("s", base_url=srv.base_url, api_key="k")
        assert isinstance(teacher.backend, OpenAIBackend) and isinstance(subject.backend, OpenAIBackend)

        async def ask() -> None:
            c = await teacher.complete(MSGS, GenParams(max_new_tokens=7, temperature=0.5, top_p=0.9))
            assert (c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens) == ("fine", "stop", 10, 5)
            await teacher.aclose()

        asyncio.run(ask())
        gens = subject.generate([MSGS, RawPrompt("Q: 1+1\nA:")], max_new_tokens=3, do_sample=True, temperature=0.7, seed=5)
        assert [g.text for g in gens] == ["fine", "fine"] and subject.usage == {"prompt_tokens": 20, "completion_tokens": 10, "requests": 2}
        vllm = OpenAIBackend("v", base_url=srv.base_url, api_key="k", extra_body={"vllm_xargs": {"personafuse_weights": [1] + [0] * 9}})

        async def ask_vllm() -> None:
            r = await vllm.chat(MSGS, max_tokens=2, temperature=0.0)
            assert r.text == "fine" and r.usage["total_tokens"] == 15
            await vllm.aclose()

        asyncio.run(ask_vllm())
    by_model: dict[str, list[dict]] = {}
    for body in srv.requests:
        by_model.setdefault(body["model"], []).append(body)
    assert by_model["t"] == [{"model": "t", "messages": MSGS, "max_tokens": 7, "temperature": 0.5, "top_p": 0.9}]
    assert sorted(by_model["s"], key=lambda b: "prompt" in b) == [
        {"model": "s", "messages": MSGS, "max_tokens": 3, "temperature": 0.7, "seed": 5},
        {"model": "s", "prompt": "Q: 1+1\nA:", "max_tokens": 3, "temperature": 0.7, "seed": 5}]
    assert by_model["v"] == [{"model": "v", "messages": MSGS, "max_tokens": 2, "temperature": 0.0,
                              "vllm_xargs": {"personafuse_weights": [1] + [0] * 9}}]


def test_one_retry_policy_an_empty_reply_is_a_fault_for_a_teacher_and_an_answer_for_a_subject() -> None:
    """Both retry a 500 and then succeed; an empty content is retried by the teacher (then rejected
    as endpoint_empty) but is a valid reply from a model under test."""
    flaky = [{"role": "user", "content": "Message:\nhi [500x2]"}]
    blank = [{"role": "user", "content": "Message:\nhi [blank]"}]
    with StubServer() as srv:
        teacher = OpenAITeacher("stub", base_url=srv.base_url, max_retries=2, backoff=0.01)
        subject = OpenAISubject("stub", base_url=srv.base_url, max_retries=2, backoff=0.01)

        async def ask() -> tuple[str, str]:
            try:
                ok = await teacher.complete(flaky, GenParams(max_new_tokens=8))
                with pytest.raises(TeacherRequestError) as e:
                    await teacher.complete(blank, GenParams(max_new_tokens=8))
                return ok.text, e.value.reason
            finally:
                await teacher.aclose()

        text, reason = asyncio.run(ask())
        assert text == "Plain answer to: hi [500x2]" and reason == "endpoint_empty"
        assert teacher.retries == 2 + 2 and teacher.endpoint_stats.http_status[500] == 2
        flaky2 = [{"role": "user", "content": "Message:\nagain [500x2]"}]
        assert [g.text for g in subject.generate([flaky2, blank], max_new_tokens=8)] == ["Plain answer to: again [500x2]", ""]
        assert subject.endpoint.stats.retries == 2
