"""PersonaFuseModel: a frozen causal LM with mixture layers, plus the situation-aware router.

model = PersonaFuseModel.from_config(PersonaFuseConfig())          # embedded defaults
out = model.generate(["I can't sleep before my exam"])            # router decides
out[0].text, out[0].weights                                        # reply and ten weights
model.generate(["Prove that sqrt(2) is irrational"], routing=Routing("pole", pole="high_C"))
model.save_pretrained("ckpt"); PersonaFuseModel.from_pretrained("ckpt")
model.export_lora(weights, "fixed-persona")    # one standard peft LoRA of rank 10r
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CompileConfig

from personafuse import embedded
from personafuse.chat import Generation, encode_prompts, eos_token_ids
from personafuse.chat import as_messages as as_messages  # re-exported: its old home
from personafuse.moe.config import PersonaFuseConfig
from personafuse.moe.decoding import cache_kwarg, greedy_generate, plain_greedy, static_cache
from personafuse.moe.mixture import MixtureLinear, MixtureState, inject_mixture, mixture_layers
from personafuse.moe.packing import group_layers
from personafuse.moe.router import PersonaEncoder, Router, router_inputs, router_text
from personafuse.moe.routing import Routing
from personafuse.traits import POLE_DESCRIPTIONS, TRAIT_POLES, TraitError, weights_dict, weights_from_any

# Compiled generation sizes its KV cache in steps of this many positions: one graph serves prompts
# of any length within a step, for attention over at most this many unused positions.
CACHE_STEP = 256
ROUTE_CHUNK = 64  # queries per router forward in route(): bounds the encoder's memory
EXPERTS_FILE = "experts.safetensors"
ROUTER_FILE = "router.safetensors"
ENCODER_DELTA_FILE = "encoder_delta.safetensors"

Prompt = str | Sequence[Mapping[str, str]]



Weights = torch.Tensor | Sequence[float] | Sequence[Sequence[float]] | Mapping[str, float] | Sequence[Mapping[str, float]]


def weights_matrix(weights: Weights, what: str = "weights") -> torch.Tensor:
    """[rows, 10] float32 mixture weights from one vector or one per row: a tensor ([10] or
    [B, 10]), ten numbers, a ``{pole: weight}`` mapping, or a list of such rows. Every row is
    checked as :func:`~personafuse.traits.weights_from_any` checks one (length, poles, values >= 0,
    finite), and a bad one raises :class:`~personafuse.traits.TraitError` naming its row and entry."""
    if isinstance(weights, torch.Tensor):
        if weights.dim() not in (1, 2):
            raise TraitError(f"{what} must have shape [10] or [rows, 10], got {tuple(weights.shape)}")
        t = weights.detach().float().cpu()
        rows: list = [t.tolist()] if t.dim() == 1 else t.tolist()
    elif isinstance(weights, Mapping | str | bytes):
        rows = [weights]
    else:
        rows = list(weights)
        if not rows or not all(isinstance(r, Mapping) or _is_sequence(r) for r in rows):
            rows = [rows]  # one vector of numbers (or a bad one: weights_from_any names the entry)
    if len(rows) == 1:
        return torch.tensor([weights_from_any(rows[0], what=what)], dtype=torch.float32)
    return torch.tensor([weights_from_any(r, what=f"{what}[{i}]") for i, r in enumerate(rows)], dtype=torch.float32)


def _is_sequence(x: object) -> bool:
    return isinstance(x, Sequence | torch.Tensor) and not isinstance(x, str | bytes)


def _prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (a string or one conversation) or a batch of them, as a batch."""
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], Mapping)):
        return [prompts]  # type: ignore[list-item]
    return list(prompts)  # type: ignore[arg-type]


class PersonaFuseModel(nn.Module):
    """A frozen causal LM whose target linears mix ten LoRA experts, and the router that picks the mix.

    Build with :meth:`from_config` (base and encoder loaded from the config's specs, or passed in)
    or :meth:`from_pretrained` (a :meth:`save_pretrained` folder). :meth:`route` gives the
    router's [B, 10] weights, :meth:`generate` replies with the weights it used (any
    :class:`~personafuse.moe.routing.Routing` mode, or fixed ``weights``), :meth:`mixture_weights`
    holds weights for custom forward passes on ``base_model``, and :meth:`export_lora` writes one
    fixed mixture as a standard peft LoRA. Poles are in :data:`personafuse.TRAIT_POLES` order.
    """

    def __init__(
        self,
        config: PersonaFuseConfig,
        base_model: nn.Module,
        tokenizer: Any,
        router: Router,
        encoder_tokenizer: Any,
        state: MixtureState,
    ) -> None:
        super().__init__()
        self.config = config
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.router = router
        self.encoder_tokenizer = encoder_tokenizer
        self.state = state
        # Fingerprints of the encoder as loaded, so save_pretrained can store only changed tensors
        # without reloading the encoder from its source.
        self._encoder_digests = _digests(router.encoder.backbone)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(
        cls,
        config: PersonaFuseConfig | None = None,
        *,
        base_model: nn.Module | None = None,
        tokenizer: Any = None,
        encoder_backbone: nn.Module | None = None,
        encoder_tokenizer: Any = None,
        init_experts: bool = True,
        device: str | torch.device | None = None,
    ) -> PersonaFuseModel:
        """Build a fresh Persona-MoE. Models not passed in are loaded from the config's specs (in
        ``config.dtype``). ``device``: where the whole model goes, the router's encoder included
        (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``: :func:`personafuse.devices.resolve_device`)."""
        config = config or PersonaFuseConfig()
        torch.manual_seed(config.seed)
        src = None
        if base_model is None:
            src = embedded.resolve(config.base_model, config.base_gguf_file)
            base_model = embedded.load_causal_lm(src, config.dtype)
            tokenizer = tokenizer or embedded.load_tokenizer(src)
        if tokenizer is None:
            raise ValueError("a tokenizer is required when base_model is passed in")
        if encoder_backbone is None:
            esrc = embedded.resolve(config.encoder_model, config.encoder_gguf_file)
            if src is not None and (esrc.path, esrc.gguf_file) == (src.path, src.gguf_file):
                # The encoder starts as the base model's own body (the default): copy it rather
                # than load the same checkpoint twice. Its own copy, since stage 2 trains it.
                encoder_backbone = copy.deepcopy(base_model.get_decoder())
                encoder_tokenizer = encoder_tokenizer or copy.deepcopy(tokenizer)
            else:
                encoder_backbone = embedded.load_backbone(esrc, config.dtype)
                encoder_tokenizer = encoder_tokenizer or embedded.load_tokenizer(esrc)
        if encoder_tokenizer is None:
            raise ValueError("an encoder tokenizer is required when encoder_backbone is passed in")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if encoder_tokenizer.pad_token is None:
            encoder_tokenizer.pad_token = encoder_tokenizer.eos_token
        # The router reads the end of long conversations.
        encoder_tokenizer.truncation_side = "left"

        for p in base_model.parameters():
            p.requires_grad_(False)
        state = MixtureState(config.num_experts, config.r, config.scaling)
        inject_mixture(base_model, list(config.target_modules), state, config.dropout)
        group_layers(base_model, state)  # the packed inference layout (used on accelerators)
        encoder = PersonaEncoder(encoder_backbone, config.embed_dim, config.encoder_pooling)
        router = Router(encoder, config.num_experts, config.embed_dim, config.tau)
        model = cls(config, base_model, tokenizer, router, encoder_tokenizer, state)
        if device is not None:
            from personafuse.devices import resolve_device

            model.to(resolve_device(str(device)))
        if init_experts:
            model.center_encoder_on_descriptions()
            if config.expert_init == "descriptions":
                model.init_expert_embeddings_from_descriptions()
        return model

    @torch.no_grad()
    def center_encoder_on_descriptions(self) -> None:
        """Set the encoder's centre to the mean pooled encoding of the ten pole descriptions: it
        removes the direction every query shares, which otherwise keeps the weights flat
        (PersonaEncoder, docs/training.md)."""
        enc = self.encode_queries([f"{p.replace('_', ' ')}: {POLE_DESCRIPTIONS[p]}" for p in TRAIT_POLES])
        self.router.encoder.center.copy_(self.router.encoder.pooled(enc["input_ids"], enc["attention_mask"]).float().mean(0))

    @torch.no_grad()
    def init_expert_embeddings_from_descriptions(self) -> None:
        """Start e_i at the projected encoding of pole i's description, so that before any training
        the router already prefers poles whose description resembles the query."""
        texts = [f"{p.replace('_', ' ')}: {POLE_DESCRIPTIONS[p]}" for p in TRAIT_POLES]
        self.router.expert_embeddings.copy_(self.persona_embeddings(texts).float())

    # ------------------------------------------------------------------ routing
    @property
    def device(self) -> torch.device:
        return next(self.router.parameters()).device

    def encode_queries(self, queries: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        enc = router_inputs(self.encoder_tokenizer, queries, self.config.encoder_max_length)
        return {k: v.to(self.device) for k, v in enc.items()}

    def persona_embeddings(self, queries: Sequence[Prompt]) -> torch.Tensor:
        enc = self.encode_queries(queries)
        return self.router.encoder(enc["input_ids"], enc["attention_mask"])

    def route(self, queries: Prompt | Sequence[Prompt], tau: float | None = None) -> torch.Tensor:
        """Router weights [B, 10] for a query, a conversation or a batch of them (no gradients; see
        ``router`` to train). ``tau`` overrides the config's temperature for this call."""
        queries = _prompt_list(queries)
        if not queries:
            return torch.empty(0, self.config.num_experts)
        out = []
        with torch.no_grad():  # in chunks: the encoder sees at most ROUTE_CHUNK queries at once
            for i in range(0, len(queries), ROUTE_CHUNK):
                enc = self.encode_queries(queries[i : i + ROUTE_CHUNK])
                out.append(self.router(enc["input_ids"], enc["attention_mask"], tau=tau)[0].float())
        return torch.cat(out)

    def resolve_weights(
        self, queries: Sequence[Prompt], routing: Routing | str | Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        """[B, 10] weights for these queries under a routing mode (default: the router)."""
        return Routing.coerce(routing).weights_for(queries, self.route)

    def resolve_each(self, queries: Sequence[Prompt], routings: Sequence[Routing]) -> torch.Tensor:
        """[B, 10] weights, row ``b`` under ``routings[b]`` (the server: one routing per request),
        with one router call for the rows that need it. Each row is resolved exactly as
        :meth:`resolve_weights` resolves it, query key included, so a seeded Random Route draws the
        same experts for a query here as in :meth:`generate`."""
        if len(queries) != len(routings):
            raise ValueError(f"{len(queries)} queries but {len(routings)} routings")
        need = [i for i, r in enumerate(routings) if r.needs_router]
        routed = self.route([queries[i] for i in need]) if need else None
        row_of = {i: n for n, i in enumerate(need)}
        rows = []
        for i, (q, r) in enumerate(zip(queries, routings, strict=True)):
            rw = routed[row_of[i]].unsqueeze(0) if i in row_of else None  # type: ignore[index]
            rows.append(r.resolve(1, rw, keys=[router_text(q)]).float().cpu())
        return torch.cat(rows) if rows else torch.empty(0, self.config.num_experts)

    @contextmanager
    def mixture_weights(
        self, weights: Weights | None
    ) -> Iterator[None]:
        """Hold these weights ([B, 10], or one vector for every row) for the forward passes inside."""
        if weights is not None:
            checked = weights_matrix(weights)  # a [B, 10] tensor is used itself (its dtype and grad)
            is_matrix = isinstance(weights, torch.Tensor) and weights.dim() == 2
            weights = (weights if is_matrix else checked).to(self.device)
        with self.state.use(weights):
            yield

    def forward(self, input_ids: torch.Tensor, weights: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The base model's forward with the mixture live. ``weights``: [B, 10] (None = base only).

        The weights stay set after the call (until the next forward or :meth:`mixture_weights`), so
        that activation checkpointing recomputes the same mixture during backward."""
        if weights is not None:
            weights = weights.to(input_ids.device)
        self.state.set(weights)
        return self.base_model(input_ids=input_ids, **kwargs)

    # ------------------------------------------------------------------ generation
    def chat_inputs(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        enc = encode_prompts(self.tokenizer, prompts)  # personafuse.chat: the one prompt format
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    @torch.no_grad()
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        routing: Routing | str | Mapping[str, Any] | None = None,
        *,
        weights: Weights | None = None,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int = 8,
        seed: int | None = None,
        compile: bool | dict[str, Any] = False,
    ) -> list[Generation]:
        """Generate replies for strings or chat-message lists. Each reply reports its ten weights.

        ``routing``: a :class:`~personafuse.moe.routing.Routing`, its CLI form (``"top_k:2"``,
        ``"pole:high_A"``, ...) or its JSON form (``{"mode": "random", "k": 2}``); default the router.
        ``weights`` (one vector for all prompts, or one per prompt: [B, 10]) overrides ``routing``. Greedy decoding
        runs :func:`personafuse.moe.decoding.greedy_generate` (the same tokens as transformers'
        ``generate``, without a host sync per token) unless the base model's generation config
        processes logits (repetition penalty and the like), which ``generate`` then applies.
        ``compile``: True compiles the decoding step (CUDA graphs on GPUs; a static KV cache held
        for the next call of the same batch size), a dict passes ``torch.compile`` options. Compiled,
        every batch is filled up to ``batch_size`` rows (repeats of one of its prompts, dropped from
        the result) and the KV cache sized in steps of ``CACHE_STEP`` positions, so one compiled graph
        serves calls of any size that fit: each new shape would compile another (about a minute for
        an 8B model). Set ``batch_size`` to the number of prompts you usually send.
        """
        prompts = _prompt_list(prompts)
        if not prompts:
            return []
        if weights is not None:
            w_all = weights_matrix(weights)
            if w_all.shape[0] == 1:
                w_all = w_all.expand(len(prompts), -1)
            if w_all.shape[0] != len(prompts):
                raise TraitError(f"weights has {w_all.shape[0]} rows for {len(prompts)} prompts")
        else:
            w_all = self.resolve_weights(prompts, routing)
        if seed is not None:
            torch.manual_seed(seed)
        tok = self.tokenizer
        # every id that ends a reply, as the decoding loops stop on any of them
        eos = torch.tensor(sorted(eos_token_ids(tok, self.base_model)), dtype=torch.long)
        results: list[Generation | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(router_text(prompts[i])))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            # filler rows repeat a prompt of the batch, so the real rows' padding stays as it is
            rows = idx + [idx[-1]] * (batch_size - len(idx)) if compile else idx
            enc = self.chat_inputs([prompts[i] for i in rows])
            w = w_all[rows].to(self.device)
            gen_kwargs: dict[str, Any] = {
                "max_new_tokens": max_new_tokens,
                "do_sample": do_sample,
                "pad_token_id": tok.pad_token_id,
            }
            if do_sample:
                gen_kwargs.update(temperature=temperature, top_p=top_p)
            else:
                gen_kwargs.update(temperature=None, top_p=None, top_k=None)
            cache_len = -(-(enc["input_ids"].shape[1] + max_new_tokens) // CACHE_STEP) * CACHE_STEP
            with self.state.use(w):
                if not do_sample and plain_greedy(getattr(self.base_model, "generation_config", None)):
                    out = greedy_generate(self.base_model, enc["input_ids"], enc["attention_mask"],
                                          max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                          compile=compile, cache_len=cache_len if compile else None)  # fmt: skip
                else:
                    if compile:
                        # the same held static cache: transformers compiles its forward for it (on
                        # CUDA) and, its shape fixed, keeps that graph for the next call
                        cache = static_cache(self.base_model, len(rows), cache_len, keep=True)[0]
                        gen_kwargs[cache_kwarg(self.base_model)] = cache
                        if isinstance(compile, dict):
                            gen_kwargs["compile_config"] = CompileConfig(**compile)
                    out = self.base_model.generate(**enc, **gen_kwargs)
            new = out[:, enc["input_ids"].shape[1] :]
            for row, i in enumerate(idx):
                ids = new[row]
                n = int((ids != tok.pad_token_id).sum()) if tok.pad_token_id is not None else len(ids)
                stops = torch.isin(ids, eos.to(ids.device)).nonzero()
                eos_hit = len(stops) > 0
                results[i] = Generation(
                    text=tok.decode(ids, skip_special_tokens=True).strip(),
                    weights=weights_dict(w_all[i].tolist()),
                    prompt_tokens=int(enc["attention_mask"][row].sum()),
                    # the stop token counts, also where padding uses the same id
                    completion_tokens=n + int(eos_hit and int(ids[stops[0, 0]]) == tok.pad_token_id),
                    finish_reason="stop" if eos_hit else "length",
                )
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ persistence
    def expert_parameters(self) -> dict[str, nn.Parameter]:
        """The ten experts' stacked LoRA factors, by their names in this module (what stages 1
        and 3 train)."""
        return {
            f"base_model.{name}.{part}": getattr(layer, part)
            for name, layer in self.mixture_layers.items()
            for part in ("lora_A", "lora_B")
        }

    def router_parameters(self) -> dict[str, nn.Parameter]:
        """The router's parameters (encoder, projection, expert embeddings), by their names in this
        module (what stages 2 and 3 train)."""
        return {f"router.{n}": p for n, p in self.router.named_parameters()}

    @property
    def mixture_layers(self) -> dict[str, MixtureLinear]:
        return mixture_layers(self.base_model)

    def experts_state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, layer in self.mixture_layers.items():
            out[f"{name}.lora_A"] = layer.lora_A.detach().contiguous()
            out[f"{name}.lora_B"] = layer.lora_B.detach().contiguous()
        return out

    def router_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "expert_embeddings": self.router.expert_embeddings.detach().contiguous(),
            "proj.weight": self.router.encoder.proj.weight.detach().contiguous(),
            "center": self.router.encoder.center.detach().contiguous(),
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config + experts + router + the encoder tensors that differ from its base model.
        Base weights are never copied: the config references them by id or path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"format": "personafuse", "poles": ",".join(TRAIT_POLES)}
        save_file(self.experts_state_dict(), str(d / EXPERTS_FILE), metadata=meta)
        save_file(self.router_state_dict(), str(d / ROUTER_FILE), metadata=meta)
        delta = self._encoder_delta()
        delta_path = d / ENCODER_DELTA_FILE
        if delta:
            save_file(delta, str(delta_path), metadata=meta)
        elif delta_path.exists():
            delta_path.unlink()
        self.config.save(d)
        return d

    def _encoder_delta(self) -> dict[str, torch.Tensor]:
        current = _digests(self.router.encoder.backbone)
        state = self.router.encoder.backbone.state_dict()
        return {
            name: state[name].detach().cpu().contiguous()
            for name, d in current.items()
            if self._encoder_digests.get(name) != d
        }

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None,
        device: str | torch.device | None = None, **overrides: Any,
    ) -> PersonaFuseModel:  # fmt: skip
        """Load a :meth:`save_pretrained` folder, or a Hub repo id holding one (its config and
        safetensors files are fetched, or read from the Hub cache offline; ``revision`` and
        ``cache_dir`` as in ``huggingface_hub.snapshot_download``). ``overrides`` replace config
        fields (e.g. ``dtype="bfloat16"``; without one the checkpoint's own ``dtype`` holds, and a
        checkpoint saying ``auto`` gets :func:`personafuse.devices.resolve_dtype`'s choice for
        ``device``); the base model and encoder load from the config's specs, then the whole model
        goes to ``device`` (as in :meth:`from_config`)."""
        d = Path(directory)
        if not d.is_dir():
            d = _hub_checkpoint(str(directory), revision, cache_dir)
        config = PersonaFuseConfig.load(d)
        unknown = sorted(set(overrides) - set(config.to_dict()))
        if unknown:
            raise TypeError(f"from_pretrained: unknown config override(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(config.to_dict()))}")  # fmt: skip
        for k, v in overrides.items():
            setattr(config, k, v)
        config.validate()
        if device is not None and config.dtype == "auto":
            from personafuse import devices

            src = embedded.resolve(config.base_model, config.base_gguf_file)
            config.dtype = devices.resolve_dtype("auto", devices.resolve_device(str(device)),
                                                 devices.source_dtype(src.path, src.gguf_file))  # fmt: skip
        model = cls.from_config(config, init_experts=False, device=device)
        model.load_weights(d)
        return model

    def load_weights(self, directory: str | Path) -> None:
        d = Path(directory)
        for fname in (EXPERTS_FILE, ROUTER_FILE):
            if not (d / fname).is_file():
                raise FileNotFoundError(f"{d / fname} is missing from the checkpoint")
        experts = load_file(str(d / EXPERTS_FILE))
        layers = self.mixture_layers
        expected = {f"{n}.lora_{x}" for n in layers for x in "AB"}
        if set(experts) != expected:
            missing = sorted(expected - set(experts))[:3]
            extra = sorted(set(experts) - expected)[:3]
            raise ValueError(
                f"{d / EXPERTS_FILE}: tensors do not match the model (missing {missing}, unexpected {extra})"
            )
        with torch.no_grad():
            for name, layer in layers.items():
                for x in "AB":
                    dst = getattr(layer, f"lora_{x}")
                    src = experts[f"{name}.lora_{x}"]
                    if src.shape != dst.shape:
                        raise ValueError(
                            f"{d / EXPERTS_FILE}: {name}.lora_{x} has shape {tuple(src.shape)}, model needs {tuple(dst.shape)}"
                        )
                    dst.copy_(src)
            router = load_file(str(d / ROUTER_FILE))
            self.router.expert_embeddings.copy_(router["expert_embeddings"])
            self.router.encoder.proj.weight.copy_(router["proj.weight"])
            if "center" in router:  # absent from checkpoints saved before centring: zero, as they routed
                self.router.encoder.center.copy_(router["center"])
            if (d / ENCODER_DELTA_FILE).is_file():
                delta = load_file(str(d / ENCODER_DELTA_FILE))
                missing, unexpected = self.router.encoder.backbone.load_state_dict(delta, strict=False)
                if unexpected:
                    raise ValueError(f"{d / ENCODER_DELTA_FILE}: unknown encoder tensors {unexpected[:3]}")

    # ------------------------------------------------------------------ export
    def export_lora(self, weights: Weights, directory: str | Path) -> Path:
        """Write a fixed mixture as one standard peft LoRA (rank 10r) with identical outputs.

        Per layer the mixture adds sum_i w_i (alpha/r) B_i A_i x. Scaling A_i by w_i and concatenating
        gives B_cat (A_cat * w) x; a peft LoRA of rank 10r and lora_alpha = 10*alpha applies exactly
        that scale (alpha/r), so vLLM, LoRAX or plain peft can serve the persona.
        ``personafuse_mixture.json`` beside it records the weights and the base (with its GGUF
        file, which ``AutoPeftModelForCausalLM.from_pretrained(dir, gguf_file=...)`` needs).
        """
        w_rows = weights_matrix(weights)
        if w_rows.shape[0] != 1:
            raise TraitError(f"export_lora takes one mixture (ten weights), got {w_rows.shape[0]} rows")
        w = w_rows[0]
        return self._write_lora(directory, w, {"weights": weights_dict(w.tolist())})

    def export_stack(self, directory: str | Path) -> Path:
        """Write the ten experts unweighted as one rank-10r LoRA for the vLLM plugin
        (``personafuse.serving.vllm_plugin``), which scales rank block i by each request's w_i between
        vLLM's shrink and expand: ``y = W x + (alpha/r) B_cat diag(w ⊗ 1_r) A_cat x``. Loaded
        without the plugin (or sent without weights) it would apply every expert at full strength,
        so ``personafuse_mixture.json`` marks it ``"stack": true`` and the plugin refuses such
        requests."""
        cfg = self.config
        info = {"stack": True, "poles": list(TRAIT_POLES), "expert_rank": cfg.r, "num_experts": cfg.num_experts}
        return self._write_lora(directory, torch.ones(cfg.num_experts), info)

    def _write_lora(self, directory: str | Path, w: torch.Tensor, info: dict[str, Any]) -> Path:
        from peft import LoraConfig

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        cfg = self.config
        rank = cfg.r * cfg.num_experts
        w_rows = w.float().repeat_interleave(cfg.r)
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in self.mixture_layers.items():
            a = layer.lora_A.detach().float().cpu() * w_rows[:, None]
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(layer.lora_A.dtype).contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.detach().cpu().contiguous()
        save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        try:
            base = embedded.resolve(cfg.base_model, cfg.base_gguf_file)
        except embedded.ModelNotFoundError:  # not here now (a moved path): keep the reference as written
            base = embedded.ModelSource(cfg.base_model, cfg.base_model, cfg.base_gguf_file)
        LoraConfig(
            r=rank,
            lora_alpha=cfg.alpha * cfg.num_experts,
            lora_dropout=0.0,
            target_modules=sorted(set(cfg.target_modules)),
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=base.path,
        ).save_pretrained(str(d))
        # A GGUF base (the embedded default) loads only with its file named:
        # AutoPeftModelForCausalLM.from_pretrained(dir, gguf_file=...) (docs/model.md). vLLM reads no
        # GGUF here: serve_model is the converted Hugging Face folder it loads.
        info |= {"base_model": base.path, "base_gguf_file": base.gguf_file, "serve_model": embedded.converted(base).path}
        (d / "personafuse_mixture.json").write_text(json.dumps(info, indent=2) + "\n")
        return d


# The ranks vLLM's --max-lora-rank accepts (vllm-project/vllm, vllm/config.py, LoRAConfig.__post_init__:
# possible_max_ranks); an adapter of rank r loads only with max_lora_rank >= r
# (vllm/lora/peft_helper.py, PEFTHelper.validate_legal).
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``vllm serve --max-lora-rank`` that loads an adapter of this rank."""
    for m in VLLM_MAX_LORA_RANKS:
        if rank <= m:
            return m
    raise ValueError(f"rank {rank} is above every max_lora_rank vLLM accepts ({VLLM_MAX_LORA_RANKS[-1]})")


def _hub_checkpoint(repo_id: str, revision: str | None, cache_dir: str | Path | None) -> Path:
    """The local snapshot of a checkpoint on the Hub; a path that does not exist is named as such."""
    from personafuse.moe.config import CONFIG_NAME

    looks_local = repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1
    if looks_local:
        raise FileNotFoundError(f"PersonaFuse checkpoint directory {repo_id!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=[CONFIG_NAME, "*.safetensors"]))  # fmt: skip
    except Exception as e:  # offline and not cached, unknown repo, no access: say which and why
        raise FileNotFoundError(
            f"PersonaFuse checkpoint {repo_id!r} is neither a local directory nor a loadable Hub repo "
            f"({type(e).__name__}: {e})"
        ) from None


def _digests(module: nn.Module) -> dict[str, str]:
    """A content hash per tensor (exact: any changed bit changes it)."""
    out = {}
    for name, t in module.state_dict().items():
        data = t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        out[name] = f"{t.dtype}:{tuple(t.shape)}:" + hashlib.blake2b(data, digest_size=16).hexdigest()
    return out
