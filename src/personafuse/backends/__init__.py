"""One backend layer for every model the package calls: data teachers
(:mod:`personafuse.data.teachers`), benchmark subjects and LLM judges
(:mod:`personafuse.evaluation.subjects`).

======  ==========================================================================================
kind    what runs
======  ==========================================================================================
hf      a transformers causal LM in this process (:mod:`personafuse.backends.local_hf`): loading on
        ``--device`` in ``--dtype``, padded dynamic batching, option scoring by log-likelihood
openai  any OpenAI-compatible HTTP endpoint (:mod:`personafuse.backends.openai_compat`) under the one
        retry and deadline policy of :mod:`personafuse.endpoint`; extra body fields (a vLLM
        server's ``vllm_xargs``, our server's ``persona``) ride along in ``extra_body``
vllm    vLLM's offline engine (:mod:`personafuse.backends.vllm_offline`), which places and batches
        itself
======  ==========================================================================================

Each kind declares :class:`Capabilities`; callers ask them (``teacher_backend(spec).capabilities``)
rather than reading spec prefixes. The spec grammars stay where they were: ``--teacher``
(``default``, ``hf:``, ``openai:``, ``vllm:``) and ``--model`` (:mod:`personafuse.specs`).
"""

from personafuse.backends.base import (
    CAPABILITIES,
    CHAT_ONLY,
    HF,
    NOTHING,
    OPENAI,
    TEACHER_KINDS,
    VLLM,
    BackendError,
    BackendSpec,
    Capabilities,
    Completion,
    GenParams,
    model_backend,
    teacher_backend,
    teacher_capabilities,
    teacher_kind,
)

__all__ = [
    "CAPABILITIES",
    "CHAT_ONLY",
    "HF",
    "NOTHING",
    "OPENAI",
    "TEACHER_KINDS",
    "VLLM",
    "BackendError",
    "BackendSpec",
    "Capabilities",
    "Completion",
    "GenParams",
    "model_backend",
    "teacher_backend",
    "teacher_capabilities",
    "teacher_kind",
]
