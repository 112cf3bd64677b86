"""Models under test ("subjects") behind one small interface.

A subject turns a batch of prompts (strings or chat message lists) into :class:`Generation` objects
carrying the text and, for PersonaFuse, the ten routing weights used. Specs accepted by
:func:`load_subject`:

* ``default`` — the embedded PersonaFuse (SmolLM2-135M-Instruct with its experts and router);
* ``base`` — the embedded SmolLM2-135M-Instruct alone (no experts);
* ``hf:ID_OR_PATH`` — any Hugging Face causal LM;
* ``lora:DIR`` — a peft LoRA adapter on the base named in its ``adapter_config.json``;
* ``openai:MODEL`` — an OpenAI-compatible endpoint (``base_url``/``api_key`` or
  ``OPENAI_BASE_URL``/``OPENAI_API_KEY``);
* ``pf:DIR`` or a folder holding ``personafuse_config.json`` — a PersonaFuse checkpoint, wrapped by
  duck typing (``from_pretrained``, ``generate(..., routing=)``, ``route``), with a routing spec
  ``router | fixed:POLE=W,... | random:K | pole:NAME | top_k:K | blend:ALPHA:POLE=W,...``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from personafuse.backends.base import HF, OPENAI, Capabilities
from personafuse.backends.local_hf import load_hf as load_hf  # re-exported: its old home
from personafuse.backends.openai_compat import OpenAIBackend, resolve_api_key
from personafuse.chat import Generation, RawPrompt, as_messages, encode_prompts
from personafuse.specs import ModelSpec, load_personafuse
from personafuse.specs import is_personafuse_dir as is_personafuse_dir  # re-exported: its old home
from personafuse.traits import TRAIT_POLES, pole_name, weights_dict

Prompt = str | list[dict[str, str]]


class Subject(Protocol):
    name: str
    capabilities: Capabilities  # what its backend can do (personafuse.backends)

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> list[Generation]: ...

    def describe(self) -> dict[str, Any]: ...


# ---------------------------------------------------------------------------------------------
# Hugging Face causal LM (plain, LoRA, or the embedded default)
# ---------------------------------------------------------------------------------------------
class HFSubject:
    """Batched greedy (or seeded sampled) generation with left padding and the chat template, on
    a model loaded by the hf backend (:func:`personafuse.backends.local_hf.load_hf`)."""

    capabilities = HF

    def __init__(self, model: Any, tokenizer: Any, *, name: str = "hf", batch_size: int = 8, system_prompt: str | None = None, source: dict[str, Any] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.system_prompt = system_prompt
        self.source = source or {}
        tokenizer.padding_side = "left"  # decoder-only batched generation needs left padding
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model.eval()

    def _encode(self, prompts: Sequence[Prompt]) -> Any:
        return encode_prompts(self.tokenizer, prompts, self.system_prompt)  # personafuse.chat

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int, do_sample: bool = False, temperature: float | None = None, seed: int | None = None) -> list[Generation]:
        import torch

        out: list[Generation | None] = [None] * len(prompts)
        # Sort by length so each batch pads little; restore the order at the end.
        order = sorted(range(len(prompts)), key=lambda i: len(str(prompts[i])))
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            enc = self._encode([prompts[i] for i in idx])
            with torch.no_grad():
                if do_sample:  # the shared sampler, as generate and serve sample (personafuse.sampling)
                    gen = _sampled(self.model, enc, max_new_tokens, max(float(temperature or 1.0), 1e-3), seed, self.tokenizer.pad_token_id)
                else:
                    gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                              do_sample=False, temperature=None, top_p=None, top_k=None)  # fmt: skip
            new = gen[:, enc["input_ids"].shape[1] :]
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            for i, t in zip(idx, texts, strict=True):
                out[i] = Generation(text=t.strip())
        return [g for g in out if g is not None]

    def describe(self) -> dict[str, Any]:
        return {"kind": "hf", "name": self.name, **self.source, **_placement(self.model)}


def _sampled(model: Any, enc: Any, max_new_tokens: int, temperature: float, seed: int | None, pad_token_id: int | None) -> Any:
    """Sampled continuations on the decoding loop ``PersonaFuseModel.generate`` uses, with the
    shared sampler (one generator per row seeded with ``seed``); a model whose generation config
    processes logits samples through transformers' ``generate`` (which applies it), seeded globally."""
    import torch

    from personafuse.moe.decoding import greedy_generate, plain_greedy
    from personafuse.sampling import BatchSampler

    enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    if plain_greedy(getattr(model, "generation_config", None)):
        pick = BatchSampler(enc["input_ids"].shape[0], temperature, 1.0, seed)
        return greedy_generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                               pad_token_id=pad_token_id, pick=pick)  # fmt: skip
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, do_sample=True,
                          temperature=temperature, top_p=1.0, top_k=0)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint
# ---------------------------------------------------------------------------------------------
class OpenAISubject:
    """Chat completions against any OpenAI-compatible server
    (:class:`personafuse.backends.openai_compat.OpenAIBackend`), a few requests in flight at once,
    under the retry and deadline policy the data teachers use (:mod:`personafuse.endpoint`): one
    deadline per request (``timeout``, send to last byte), 429s on their own wait budget with
    ``Retry-After`` honoured and jittered, 5xx / timeouts / dropped connections / bodies that are
    not a completion retried ``max_retries`` times, so one endpoint fault no longer ends an eval
    cell. An empty reply is a valid (if poor) answer from a model under test and is not retried.
    A request that fails for good raises :class:`personafuse.endpoint.EndpointFailure`."""

    capabilities = OPENAI

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None, concurrency: int = 4,
                 system_prompt: str | None = None, max_retries: int = 5, timeout: float = 300.0, backoff: float = 1.0,
                 max_rate_limit_wait: float = 600.0, clock: Any = None) -> None:
        self.name = model
        self.model = model
        self.backend = OpenAIBackend(model, base_url=base_url, api_key=resolve_api_key(api_key, None) or "EMPTY",
                                     max_in_flight=max(1, concurrency), timeout=timeout, max_retries=max_retries,
                                     backoff=backoff, max_rate_limit_wait=max_rate_limit_wait, clock=clock, name=model)
        self.base_url = self.backend.base_url
        self.endpoint = self.backend.endpoint
        self.concurrency = concurrency
        self.system_prompt = system_prompt
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0}

    async def _one(self, p: Prompt, max_new_tokens: int, temperature: float, seed: int | None) -> Generation:
        kw: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
                              "require_content": False}
        if isinstance(p, RawPrompt):  # a completion prompt: the completions endpoint, no template
            r = await self.backend.complete(str(p), **kw)
        else:
            r = await self.backend.chat(as_messages(p, self.system_prompt), **kw)
        self.usage["requests"] += 1
        self.usage["prompt_tokens"] += r.usage.get("prompt_tokens") or 0
        self.usage["completion_tokens"] += r.usage.get("completion_tokens") or 0
        # Some servers (vLLM, ours) report the routing weights beside the message.
        # `persona` is our server's field; `personafuse` is kept for older servers.
        info = next((r.data[k] for k in ("persona", "personafuse") if isinstance(r.data.get(k), dict)), {})
        return Generation(text=r.text.strip(), weights=info.get("weights"))

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int, do_sample: bool = False, temperature: float | None = None, seed: int | None = None) -> list[Generation]:
        import asyncio

        from personafuse.endpoint import run_sync

        temp = float(temperature) if (do_sample and temperature is not None) else (1.0 if do_sample else 0.0)

        async def run() -> list[Generation]:
            try:  # the endpoint client caps requests in flight at ``concurrency``
                return list(await asyncio.gather(*(self._one(p, max_new_tokens, temp, seed) for p in prompts)))
            finally:
                await self.backend.aclose()  # its connections belong to this call's event loop

        return run_sync(run)

    def describe(self) -> dict[str, Any]:
        return {"kind": "openai", "name": self.model, "base_url": self.base_url}


# ---------------------------------------------------------------------------------------------
# PersonaFuse checkpoint (duck-typed; the model class lives in personafuse.moe.model)
# ---------------------------------------------------------------------------------------------
def parse_routing(spec: str | None, seed: int = 0) -> dict[str, Any]:
    """A routing spec → keyword arguments for ``personafuse.Routing`` (the grammar of
    :meth:`personafuse.Routing.parse`: ``router`` · ``random:K`` · ``top_k:K`` · ``pole:high_A`` ·
    ``fixed:high_A=0.5,low_N=0.5`` or ten comma-separated numbers · ``blend:0.3:high_A=1``)."""
    from personafuse.moe.routing import Routing

    try:
        return Routing.parse(spec or "router", seed=seed).to_dict()
    except ValueError as e:  # TraitError included
        raise ValueError(f"bad routing spec {spec!r}: {e}") from None


def _placement(model: Any) -> dict[str, str]:
    """Where a local model computed (results.json's subject): device and dtype from its parameters."""
    from personafuse.devices import placement

    if not hasattr(model, "parameters"):  # a stand-in without weights
        return {}
    device, dtype = placement(getattr(model, "base_model", model))
    return {"device": device, "dtype": dtype}


def _weights_to_dict(w: Any) -> dict[str, float] | None:
    if w is None:
        return None
    if isinstance(w, dict):
        return {pole_name(k): float(v) for k, v in w.items()}
    try:
        vals = [float(x) for x in (w.tolist() if hasattr(w, "tolist") else w)]
    except TypeError:
        return None
    return weights_dict(vals) if len(vals) == len(TRAIT_POLES) else None


class PersonaFuseSubject:
    """Wraps a PersonaFuse model: ``model.generate(prompts, ..., routing=Routing(...))`` returning
    objects with ``.text`` and ``.weights``; ``model.route(queries)`` giving [B, 10]. A
    ``system_prompt`` is put first in every chat prompt (not in raw completion prompts), as
    :class:`HFSubject` does; the router does not read system messages."""

    capabilities = replace(HF, scoring=False)  # generates through PersonaFuseModel.generate

    def __init__(self, model: Any, routing: dict[str, Any], *, name: str = "personafuse", batch_size: int = 8, source: dict[str, Any] | None = None, routing_factory: Any = None, system_prompt: str | None = None) -> None:
        self.model = model
        self.system_prompt = system_prompt
        self.routing_kwargs = routing
        self.name = name
        self.batch_size = batch_size
        self.source = source or {}
        if routing_factory is None:
            from personafuse import Routing

            routing_factory = Routing
        self.routing = routing_factory(**routing)

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int, do_sample: bool = False, temperature: float | None = None, seed: int | None = None) -> list[Generation]:
        # One call for the whole list: the model batches internally, and Random Route draws a
        # fresh expert set per row within a call.
        kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "routing": self.routing, "batch_size": self.batch_size}
        if do_sample:
            if temperature is not None:
                kw["temperature"] = temperature
            if seed is not None:
                kw["seed"] = seed
        # A benchmark may name the router's text (GSM8K: the question, not its few-shot examples).
        queries = [getattr(p, "router_query", None) for p in prompts]
        if any(q is not None for q in queries):
            kw["weights"] = self.model.resolve_weights([p if q is None else q for p, q in zip(prompts, queries, strict=True)], self.routing)
        if self.system_prompt:
            prompts = [p if isinstance(p, RawPrompt) else as_messages(p, self.system_prompt) for p in prompts]
        gens = self.model.generate(list(prompts), **kw)
        return [Generation(text=str(g.text).strip(), weights=_weights_to_dict(getattr(g, "weights", None))) for g in gens]

    def route(self, queries: Sequence[str]) -> list[dict[str, float]]:
        w = self.model.route(list(queries))
        return [weights_dict([float(x) for x in row]) for row in (w.tolist() if hasattr(w, "tolist") else w)]

    def describe(self) -> dict[str, Any]:
        return {"kind": "personafuse", "name": self.name, "routing": self.routing_kwargs, **self.source, **_placement(self.model)}


# ---------------------------------------------------------------------------------------------
@dataclass
class SubjectOptions:
    base_url: str | None = None
    api_key: str | None = None
    routing: str | None = None
    batch_size: int = 8
    dtype: str = "auto"
    device: str | None = None
    concurrency: int = 4
    system_prompt: str | None = None
    seed: int = 0


def _embedded_base(device: str | None, dtype: str = "auto") -> tuple[Any, Any, dict[str, Any]]:
    from personafuse.embedded import resolve

    src = resolve("default")
    model, tok = load_hf(src.path, gguf_file=src.gguf_file, dtype=dtype, device=device)
    return model, tok, {"path": src.path, "gguf_file": src.gguf_file}


def _lora_subject(path: str, o: SubjectOptions) -> Subject:
    import json

    from peft import PeftModel

    cfg_path = Path(path) / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not found (lora:DIR needs a peft adapter folder)")
    base = json.loads(cfg_path.read_text())["base_model_name_or_path"]
    if base in ("default", "embedded:smollm2") or not base:
        model, tok, _ = _embedded_base(o.device, o.dtype)
    else:
        model, tok = load_hf(base, dtype=o.dtype, device=o.device)
    # The adapter in the base's dtype (peft would upcast half-precision adapters to float32, so a
    # bfloat16 run would compute its LoRA in float32).
    model = PeftModel.from_pretrained(model, path, autocast_adapter_dtype=False)
    return HFSubject(model, tok, name=Path(path).name, batch_size=o.batch_size, system_prompt=o.system_prompt, source={"adapter": path, "base": base})


def load_subject(spec: str, opts: SubjectOptions | None = None) -> Subject:
    """Build a subject from a ``--model`` spec, in the grammar every command reads
    (:mod:`personafuse.specs`): ``default`` is the embedded PersonaFuse, ``base`` the plain
    embedded SmolLM2."""
    o = opts or SubjectOptions()
    s = ModelSpec.parse(spec)
    if s.kind == "openai":
        return OpenAISubject(s.target, base_url=o.base_url, api_key=o.api_key, concurrency=o.concurrency, system_prompt=o.system_prompt)
    if s.kind == "lora":
        return _lora_subject(s.target, o)
    if s.kind == "personafuse":
        model = load_personafuse(s, device=o.device, dtype=o.dtype)
        name = "personafuse-default" if s.embedded else Path(s.target).name
        return PersonaFuseSubject(model, parse_routing(o.routing, seed=o.seed), name=name, batch_size=o.batch_size, source={"path": s.target}, system_prompt=o.system_prompt)
    if s.embedded:  # ``base``
        model, tok, source = _embedded_base(o.device, o.dtype)
        return HFSubject(model, tok, name="smollm2-135m-instruct", batch_size=o.batch_size, system_prompt=o.system_prompt, source=source)
    if not Path(s.target).is_dir() and s.text == s.target and not _looks_like_hub_id(s.target):
        raise ValueError(f"unknown --model {spec!r}; use default, base, hf:ID_OR_PATH, lora:DIR, openai:MODEL or pf:DIR")
    model, tok = load_hf(s.target, dtype=o.dtype, device=o.device)
    return HFSubject(model, tok, name=Path(s.target).name or s.target, batch_size=o.batch_size, system_prompt=o.system_prompt, source={"path": s.target})


def _looks_like_hub_id(text: str) -> bool:
    """``owner/name``: a bare Hub id is read as ``hf:`` (anything else bare must be a folder)."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/"))
