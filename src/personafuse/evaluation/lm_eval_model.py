"""lm-evaluation-harness integration: a registered ``personafuse`` model class.

``lm_eval`` looks model names up in its in-process registry, so the class must be imported before
the harness runs; ``personafuse lm-eval ...`` does that and then hands its arguments to lm-eval's own
command line::

    personafuse lm-eval --model personafuse --model_args model=default,routing=router \\
        --tasks gsm8k --limit 20 --batch_size 4 --device cpu --apply_chat_template

``model`` takes the same specs as ``personafuse eval --model`` (``default``, ``hf:ID``, ``lora:DIR``,
``pf:DIR``); ``dtype`` (``--model_args ...,dtype=bfloat16``) and lm-eval's ``--device`` read as
``personafuse eval``'s ``--dtype`` / ``--device`` do (:mod:`personafuse.devices`). Everything (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``, chat
templates, batching) is lm-eval's own Hugging Face implementation, ``HFLM``.

Reference: EleutherAI/lm-evaluation-harness@3e093bc90a87cb42c148820b57452ffbb570ac8c
(lm_eval/models/huggingface.py, utils_hf.py, api/task.py and evaluator.py there are byte-identical
to the installed lm-eval 0.4.13 this module is written against; api/model.py:TemplateLM.loglikelihood
as in 0.4.13). A PersonaFuse checkpoint runs each forward pass and each generation inside
``model.mixture_weights(W)``, one weight row per sequence, and the row is chosen like this:

* **What the router reads** is the request's *context* only, never the candidate continuation, so
  all options of a log-likelihood task are scored under one mixture (as a served PersonaFuse model
  picks its mixture from the prompt before it writes a word). The context is turned into the query
  ``PersonaFuseModel.route`` would get at inference: a raw-text context is the user's message
  itself; a chat-templated context (``--apply_chat_template``) is mapped back to the conversation
  lm-eval rendered it from (this class records each ``apply_chat_template`` call), minus the
  trailing assistant prefill (a task's ``gen_prefix``), and :func:`personafuse.moe.model.router_text`
  of that conversation drops the system prompt and keeps the user turn(s), as at inference.
  ``loglikelihood_rolling``'s context is the whole document.
* **Weights** come from :meth:`personafuse.moe.routing.Routing.weights_for`, the resolution
  ``PersonaFuseModel.resolve_weights`` uses for ``generate``, so every mode means here what it
  means everywhere else.
* **Which row is whose**: ``HFLM._loglikelihood_tokens`` hands ``_model_call`` only a right-padded
  (zeros) batch of ``(context + continuation)[-(max_length + 1):][:-1]`` token rows, in an order of
  its own. Each row is matched back to its request by exactly those tokens (:class:`_RowIndex`);
  requests whose input tokens coincide under different mixtures run in separate passes. Generation
  reads the batch's context strings where ``HFLM.generate_until`` encodes them
  (``tok_batch_encode``); a rolling document runs under its one row (``_held``).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lm_eval.api.registry import model_registry
from lm_eval.models.huggingface import HFLM

from personafuse.moe.model import Prompt
from personafuse.moe.routing import Routing
from personafuse.traits import NUM_POLES

# The HFLM internals this adapter hooks (_loglikelihood_tokens' input window and zero padding,
# generate_until's tok_batch_encode) were read in this version; another one is warned about.
LM_EVAL_VERSION = "0.4.13"


def _device(requested: str | None) -> str:
    """Where a model this class loads goes: the ``device`` model argument (the grammar of
    ``--device``, :func:`personafuse.devices.resolve_device`; other torch devices such as ``meta``
    pass as they are), else the first accelerator. HFLM leaves a model it is handed where it is, so
    it is placed here, before HFLM sees it."""
    from personafuse.devices import resolve_device

    text = str(requested or "auto")
    known = text in ("auto", "cpu", "mps") or text.split(":")[0] == "cuda"
    return resolve_device(text) if known else text


def _load(spec: str, dtype: str, device: str) -> tuple[Any, Any, Any]:
    """(HF causal LM, tokenizer, PersonaFuse model or None) for a ``--model``-style spec, on
    ``device``, in the grammar every command reads (:mod:`personafuse.specs`: ``default`` is the
    embedded PersonaFuse, ``base`` the plain embedded SmolLM2)."""
    from personafuse.backends import model_backend
    from personafuse.evaluation.subjects import SubjectOptions, load_subject
    from personafuse.specs import ModelSpec, load_personafuse

    s = ModelSpec.parse(spec)
    if s.kind == "personafuse":
        pf = load_personafuse(s, device=device, dtype=dtype)
        return pf.base_model, pf.tokenizer, pf
    if not model_backend(s).capabilities.placement:  # an endpoint: no weights here to score with
        raise ValueError("model=openai:... is not a local model; use lm-eval's own local-chat-completions model for endpoints")
    subj = load_subject(spec, SubjectOptions(dtype=dtype, device=device))
    return subj.model, subj.tokenizer, None  # type: ignore[attr-defined]


def resolve_weights(
    routing: Routing | str | Mapping[str, Any],
    queries: Sequence[Prompt],
    router: Callable[[list[Prompt]], Any] | None,
) -> torch.Tensor:
    """[len(queries), 10] float32 weights for these queries under ``routing`` (a
    :class:`~personafuse.moe.routing.Routing`, its CLI form or its JSON form): exactly
    ``PersonaFuseModel.resolve_weights``, through :meth:`Routing.weights_for` (``router``, e.g.
    ``model.route``, runs only for the modes that read it; each query's router text is its key)."""
    return Routing.coerce(routing).weights_for(queries, router).cpu()


def _query_of_chat(chat: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """The conversation a PersonaFuse model would be asked to answer: lm-eval's rendered chat
    without its trailing assistant prefill (``gen_prefix``), which is the start of the answer."""
    msgs = [dict(m) for m in chat]
    while len(msgs) > 1 and msgs[-1].get("role") == "assistant":
        msgs.pop()
    return msgs


class _RowIndex:
    """The weight row of each input-token sequence of a set of log-likelihood requests, to find
    a padded batch row's mixture in ``_model_call`` (lm-eval passes the tokens only)."""

    def __init__(self) -> None:
        self._by_len: dict[int, dict[tuple[int, ...], tuple[float, ...]]] = {}

    def add(self, tokens: Sequence[int], row: tuple[float, ...]) -> bool:
        """Record ``tokens`` -> ``row``; False if these tokens already have another row."""
        same_len = self._by_len.setdefault(len(tokens), {})
        return same_len.setdefault(tuple(tokens), row) == row

    def find(self, ids: Sequence[int]) -> tuple[float, ...]:
        """The row of a batch row right-padded with zeros (``pad_and_concat``): its real length is
        at least its last non-zero position, so every length from there to the end is tried."""
        ids = tuple(ids)
        end = len(ids)
        while end and ids[end - 1] == 0:
            end -= 1
        rows = {self._by_len[n][ids[:n]] for n in range(end, len(ids) + 1)
                if n in self._by_len and ids[:n] in self._by_len[n]}  # fmt: skip
        if len(rows) != 1:
            what = "no request" if not rows else f"{len(rows)} requests with different mixtures"
            raise RuntimeError(f"PersonaFuseLM: a batch row of {end} tokens matches {what}; "
                               f"lm-eval's batching differs from version {LM_EVAL_VERSION}'s")  # fmt: skip
        return rows.pop()


class PersonaFuseLM(HFLM):
    """lm-eval's HFLM over our model loaders, with PersonaFuse mixture weights applied per sequence
    (chosen from each request's context; see the module docstring)."""

    def __init__(self, model: Any = "default", routing: str = "router", dtype: str = "auto", seed: int = 0, **kwargs: Any) -> None:
        import lm_eval

        if getattr(lm_eval, "__version__", LM_EVAL_VERSION) != LM_EVAL_VERSION:
            warnings.warn(f"PersonaFuseLM was written against lm-eval {LM_EVAL_VERSION}, this is "
                          f"{lm_eval.__version__}: check its HFLM batching hooks", stacklevel=2)  # fmt: skip
        if isinstance(model, str):
            device = _device(kwargs.get("device"))
            if kwargs.get("device"):  # HFLM checks the device itself: hand it the resolved one (not "auto")
                kwargs["device"] = device
            hf_model, tok, pf = _load(model, str(dtype), device)
        elif hasattr(model, "mixture_weights") and hasattr(model, "route"):
            hf_model, tok, pf = model.base_model, model.tokenizer, model  # a PersonaFuseModel built in-process
            if kwargs.get("device"):
                pf.to(kwargs["device"])
        else:
            raise TypeError(f"model must be a --model spec string or a PersonaFuseModel, got {type(model).__name__}")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        kwargs.pop("pretrained", None)
        kwargs.pop("tokenizer", None)
        super().__init__(pretrained=hf_model, tokenizer=tok, **kwargs)
        self._pf = pf
        try:
            self._routing: Routing | Mapping[str, Any] = Routing.parse(str(routing), seed=int(seed))
        except ValueError as e:  # TraitError included
            raise ValueError(f"model_args routing={routing!r}: {e}") from None
        self._chats: dict[str, list[dict[str, str]]] = {}  # rendered chat -> its messages
        self._index: _RowIndex | None = None  # rows of the log-likelihood requests in flight
        self._held: torch.Tensor | None = None  # [1, 10] for every row (a rolling document)
        self._batch_contexts: list[str] | None = None  # the generation batch being encoded
        self._probing = False  # batch-size detection: a dummy batch of no request
        self.last_weights: torch.Tensor | None = None  # the weights of the latest batch (for inspection)

    # ------------------------------------------------------------------ queries and weights
    def routing(self) -> Routing:
        if not isinstance(self._routing, Routing):  # set from its JSON form (tests do)
            self._routing = Routing.coerce(self._routing)
        return self._routing

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """HFLM's rendering, remembered: the router reads the conversation, not the template text."""
        text = super().apply_chat_template(chat_history, add_generation_prompt)
        self._chats[text] = _query_of_chat(chat_history)
        return text

    def query(self, context: str) -> Prompt:
        """The query ``PersonaFuseModel.route`` would get for a request with this context."""
        chat = self._chats.get(context)
        return chat if chat is not None else context

    def weights_for_contexts(self, contexts: Sequence[str]) -> torch.Tensor:
        """[len(contexts), 10] mixture weights of requests with these contexts."""
        return resolve_weights(self.routing(), [self.query(c) for c in contexts], self._pf.route)

    def _context_free(self, n: int, where: str) -> torch.Tensor:
        """Weights for a direct call with no request behind it: only modes that read no text."""
        routing = self.routing()
        if routing.needs_router:
            raise ValueError(f"PersonaFuseLM.{where} was called outside an lm-eval request: routing "
                             f"mode {routing.mode!r} reads the request's context, which is unknown here")  # fmt: skip
        return routing.resolve(n).float()

    def _rows_for_call(self, inps: torch.Tensor) -> torch.Tensor:
        n = inps.shape[0]
        if self._probing:  # memory probe: every expert live, as the heaviest real batch
            return torch.full((n, NUM_POLES), 1.0 / NUM_POLES)
        if self._held is not None:
            return self._held.expand(n, -1)
        if self._index is not None:
            index = self._index
            return torch.tensor([index.find(r) for r in inps.tolist()], dtype=torch.float32)
        return self._context_free(n, "_model_call")

    # ------------------------------------------------------------------ HFLM hooks
    def _detect_batch_size(self, requests: Sequence | None = None, pos: int = 0) -> int:
        self._probing = True
        try:
            return super()._detect_batch_size(requests, pos)
        finally:
            self._probing = False

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """HFLM's own scoring, each request under the mixture of its context alone."""
        if self._pf is None or self._held is not None or self._index is not None:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        contexts = [key[0] if key is not None else "" for key, _, _ in requests]
        unique = list(dict.fromkeys(contexts))
        rows = {c: tuple(r) for c, r in zip(unique, self.weights_for_contexts(unique).tolist(), strict=True)}
        # requests whose input tokens coincide under different rows cannot share a pass
        passes: list[tuple[_RowIndex, list[int]]] = []
        for i, (_, ctx, cont) in enumerate(requests):
            tokens = (ctx + cont)[-(self.max_length + 1) :][:-1]  # HFLM._loglikelihood_tokens' input
            for index, members in passes:
                if index.add(tokens, rows[contexts[i]]):
                    members.append(i)
                    break
            else:
                passes.append((_RowIndex(), [i]))
                passes[-1][0].add(tokens, rows[contexts[i]])
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for index, members in passes:
            self._index = index
            try:
                res = super()._loglikelihood_tokens([requests[i] for i in members], disable_tqdm, override_bs)
            finally:
                self._index = None
            for i, r in zip(members, res, strict=True):
                out[i] = r
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """HFLM's own rolling windows; each document (the request's one argument) under its row."""
        if self._pf is None:
            return super().loglikelihood_rolling(requests, disable_tqdm)
        rows = self.weights_for_contexts([req.args[0] for req in requests]).tolist()
        groups: dict[tuple[float, ...], list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(tuple(r), []).append(i)
        out = [0.0] * len(requests)
        for row, members in groups.items():
            self._held = torch.tensor([row], dtype=torch.float32)
            try:
                res = super().loglikelihood_rolling([requests[i] for i in members], disable_tqdm)
            finally:
                self._held = None
            for i, r in zip(members, res, strict=True):
                out[i] = r
        return out

    def tok_batch_encode(
        self, strings: list[str], padding_side: str = "left", left_truncate_len: int | None = None, truncation: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # generate_until encodes each batch's context strings here right before _model_generate
        self._batch_contexts = list(strings)
        return super().tok_batch_encode(strings, padding_side, left_truncate_len, truncation)

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self._pf is None:
            return super()._model_call(inps, attn_mask, labels)
        self.last_weights = w = self._rows_for_call(inps)
        with self._pf.mixture_weights(w):
            return super()._model_call(inps, attn_mask, labels)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any) -> torch.Tensor:
        if self._pf is None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        contexts, self._batch_contexts = self._batch_contexts, None
        if contexts is not None and len(contexts) == context.shape[0]:
            w = self.weights_for_contexts(contexts)
        else:
            w = self._context_free(context.shape[0], "_model_generate")
        self.last_weights = w
        with self._pf.mixture_weights(w):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)


if __name__ != "__main__":
    # Under the module's real name, so the lazy entry of the start-up hook (_personafuse_lm_eval)
    # upgrades to this class instead of clashing with it.
    model_registry.register("personafuse")(PersonaFuseLM)


def cli_main(argv: Sequence[str]) -> None:
    """Run lm-eval's command line with the ``personafuse`` model registered and, unless the caller
    names its own ``--include_path`` (lm-eval takes one), our local-file tasks (``gsm8k_local``)."""
    from lm_eval.__main__ import cli_evaluate

    from personafuse.evaluation.lm_eval_tasks import TASKS_DIR

    args = list(argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":  # python -m personafuse.evaluation.lm_eval_model --model personafuse ...
    # Run the module under its real name: lm-eval's registry holds "personafuse" as
    # personafuse.evaluation.lm_eval_model:PersonaFuseLM (see _personafuse_lm_eval).
    from personafuse.evaluation.lm_eval_model import cli_main as _cli_main

    _cli_main(sys.argv[1:])
