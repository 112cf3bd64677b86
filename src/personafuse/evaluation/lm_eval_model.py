"""lm-evaluation-harness integration: a registered ``personafuse`` model class.

``lm_eval`` looks model names up in its in-process registry, so the class must be imported before
the harness runs; ``personafuse lm-eval ...`` does that and then hands its arguments to lm-eval's own
command line::

    personafuse lm-eval --model personafuse --model_args model=default,routing=router \\
        --tasks gsm8k --limit 20 --batch_size 4 --device cpu --apply_chat_template

``model`` takes the same specs as ``personafuse eval --model`` (``default``, ``hf:ID``, ``lora:DIR``,
``pf:DIR``). Everything (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``, chat
templates, batching) is lm-eval's own Hugging Face implementation; for a PersonaFuse checkpoint each
forward pass and each generation runs inside ``model.mixture_weights(W)`` with one weight row per
sequence, resolved from the routing spec (the router reads the decoded request text).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.registry import model_registry
from lm_eval.models.huggingface import HFLM

from personafuse.traits import NUM_POLES, POLE_INDEX


def _load(spec: str, dtype: str) -> tuple[Any, Any, Any]:
    """(HF causal LM, tokenizer, PersonaFuse model or None) for a ``--model``-style spec."""
    from personafuse.evaluation.subjects import SubjectOptions, is_personafuse_dir, load_subject

    head, sep, rest = spec.partition(":")
    if (sep and head == "pf") or is_personafuse_dir(spec):
        from personafuse import PersonaFuseModel

        pf = PersonaFuseModel.from_pretrained(rest if sep else spec)
        return pf.base_model, pf.tokenizer, pf
    if sep and head == "openai":
        raise ValueError("model=openai:... is not a local model; use lm-eval's own local-chat-completions model for endpoints")
    subj = load_subject(spec, SubjectOptions(dtype=dtype))
    return subj.model, subj.tokenizer, None  # type: ignore[attr-defined]


def resolve_weights(routing: dict[str, Any], texts: Sequence[str], router: Any, *, rng: random.Random) -> torch.Tensor:
    """[B, 10] mixture weights for ``texts`` under a parsed routing spec (see subjects.parse_routing)."""
    mode = routing.get("mode", "router")
    b = len(texts)

    def routed() -> torch.Tensor:
        return torch.as_tensor(router(list(texts)), dtype=torch.float32)

    if mode == "router":
        return routed()
    if mode == "fixed":
        return torch.tensor([routing["weights"]] * b, dtype=torch.float32)
    if mode == "pole":
        w = torch.zeros(b, NUM_POLES)
        w[:, POLE_INDEX[routing["pole"]]] = 1.0
        return w
    if mode == "top_k":
        r = routed()
        top = r.topk(int(routing["k"]), dim=-1)
        w = torch.zeros_like(r).scatter(-1, top.indices, top.values)
        return w / w.sum(-1, keepdim=True)
    if mode == "random":
        k = int(routing.get("k", 1))
        w = torch.zeros(b, NUM_POLES)
        for i in range(b):
            for j in rng.sample(range(NUM_POLES), k):
                w[i, j] = 1.0 / k
        return w
    if mode == "blend":
        a = float(routing.get("alpha", 0.5))
        return a * torch.tensor([routing["weights"]] * b, dtype=torch.float32) + (1 - a) * routed()
    raise ValueError(f"unknown routing mode {mode!r}")


class PersonaFuseLM(HFLM):
    """lm-eval's HFLM over our model loaders, with PersonaFuse mixture weights applied per batch."""

    def __init__(self, model: str = "default", routing: str = "router", dtype: str = "auto", seed: int = 0, **kwargs: Any) -> None:
        from personafuse.evaluation.subjects import parse_routing

        hf_model, tok, pf = _load(str(model), str(dtype))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        kwargs.pop("pretrained", None)
        kwargs.pop("tokenizer", None)
        super().__init__(pretrained=hf_model, tokenizer=tok, **kwargs)
        self._pf = pf
        self._routing = parse_routing(routing, seed=int(seed))
        self._rng = random.Random(int(seed))
        self.last_weights: torch.Tensor | None = None  # the weights of the latest batch (for inspection)

    def _weights_for(self, ids: torch.Tensor) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        if hasattr(self._pf, "resolve_weights"):  # the model's own Routing semantics
            from personafuse import Routing

            w = self._pf.resolve_weights(texts, Routing(**self._routing)).float()
        else:
            w = resolve_weights(self._routing, texts, self._pf.route, rng=self._rng)
        self.last_weights = w
        return w.to(self.device)

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self._pf is None:
            return super()._model_call(inps, attn_mask, labels)
        with self._pf.mixture_weights(self._weights_for(inps)):
            return super()._model_call(inps, attn_mask, labels)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any) -> torch.Tensor:
        if self._pf is None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        with self._pf.mixture_weights(self._weights_for(context)):
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
