"""PersonaFuseModel: a frozen causal LM with mixture layers, plus the situation-aware router.

model = PersonaFuseModel.from_config(PersonaFuseConfig())          # embedded defaults
out = model.generate(["I can't sleep before my exam"])            # router decides
out[0].text, out[0].weights                                        # reply and ten weights
model.generate(["Prove that sqrt(2) is irrational"], routing=Routing("pole", pole="high_C"))
model.save_pretrained("ckpt"); PersonaFuseModel.from_pretrained("ckpt")
model.export_lora(weights, "fixed-persona")    # one standard peft LoRA of rank 10r

The class builds and routes; generation (:mod:`~personafuse.moe.generation`), the checkpoint format
(:mod:`~personafuse.moe.checkpoint`) and the LoRA export (:mod:`~personafuse.moe.export`) live in
modules of their own, reached through its methods.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from personafuse import embedded
from personafuse.chat import Generation as Generation  # re-exported: one result type
from personafuse.chat import as_messages as as_messages  # re-exported: its old home
from personafuse.chat import encode_prompts
from personafuse.moe import checkpoint, export, generation
from personafuse.moe.config import PersonaFuseConfig
from personafuse.moe.export import VLLM_MAX_LORA_RANKS as VLLM_MAX_LORA_RANKS
from personafuse.moe.export import vllm_max_lora_rank as vllm_max_lora_rank
from personafuse.moe.generation import CACHE_STEP as CACHE_STEP
from personafuse.moe.generation import Prompt, Weights, prompt_list, weights_matrix
from personafuse.moe.mixture import MixtureLinear, MixtureState, inject_mixture, mixture_layers
from personafuse.moe.packing import group_layers
from personafuse.moe.router import PersonaEncoder, Router, router_inputs, router_text
from personafuse.moe.routing import Routing
from personafuse.traits import POLE_DESCRIPTIONS, TRAIT_POLES

ROUTE_CHUNK = 64  # queries per router forward in route(): bounds the encoder's memory
__all__ = ["PersonaFuseModel", "Prompt", "Weights", "weights_matrix", "ROUTE_CHUNK", "router_text"]


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
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.router = router
        self.config = config  # after the router: it reads its tau from this config
        self.encoder_tokenizer = encoder_tokenizer
        self.state = state
        # Fingerprints of the encoder as loaded, so save_pretrained can store only changed tensors
        # without reloading the encoder from its source.
        self.encoder_digests = checkpoint.digests(router.encoder.backbone)

    @property
    def config(self) -> PersonaFuseConfig:
        return self._config

    @config.setter
    def config(self, value: PersonaFuseConfig) -> None:
        # one temperature: the router reads config.tau at each call, also after the config is replaced
        self._config = value
        self.router.tau_source = value

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
        router = Router(encoder, config.num_experts, config.embed_dim, config)  # reads config.tau
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
        queries = prompt_list(queries)
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
        Sampling (``do_sample``) runs the same loop with the shared sampler
        (:mod:`personafuse.sampling`: temperature, top-p, one generator per row seeded with ``seed``),
        so a prompt and seed give the same reply here, in ``serve`` and in ``eval``.
        ``compile``: True compiles the decoding step (CUDA graphs on GPUs; a static KV cache held
        for the next call of the same batch size), a dict passes ``torch.compile`` options. Compiled,
        every batch is filled up to ``batch_size`` rows (repeats of one of its prompts, dropped from
        the result) and the KV cache sized in steps of ``CACHE_STEP`` positions, so one compiled graph
        serves calls of any size that fit: each new shape would compile another (about a minute for
        an 8B model). Set ``batch_size`` to the number of prompts you usually send.
        """
        return generation.generate(self, prompts, routing, weights=weights, max_new_tokens=max_new_tokens,
                                   do_sample=do_sample, temperature=temperature, top_p=top_p, batch_size=batch_size,
                                   seed=seed, compile=compile)  # fmt: skip

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
        """Write config + experts + router + the encoder tensors that differ from its base model
        (:mod:`personafuse.moe.checkpoint`). Base weights are never copied: the config references
        them by id or path."""
        return checkpoint.save(self, directory)

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
        d, config = checkpoint.pretrained_config(directory, revision, cache_dir, device, overrides)
        model = cls.from_config(config, init_experts=False, device=device)
        model.load_weights(d)
        return model

    def load_weights(self, directory: str | Path) -> None:
        checkpoint.load_weights(self, directory)

    # ------------------------------------------------------------------ export
    def export_lora(self, weights: Weights, directory: str | Path) -> Path:
        """Write a fixed mixture as one standard peft LoRA (rank 10r) with identical outputs.

        Per layer the mixture adds sum_i w_i (alpha/r) B_i A_i x. Scaling A_i by w_i and concatenating
        gives B_cat (A_cat * w) x; a peft LoRA of rank 10r and lora_alpha = 10*alpha applies exactly
        that scale (alpha/r), so vLLM, LoRAX or plain peft can serve the persona.
        ``personafuse_mixture.json`` beside it records the weights and the base (with its GGUF
        file, which ``AutoPeftModelForCausalLM.from_pretrained(dir, gguf_file=...)`` needs).
        """
        return export.export_lora(self, weights, directory)

    def export_stack(self, directory: str | Path) -> Path:
        """Write the ten experts unweighted as one rank-10r LoRA for the vLLM plugin
        (``personafuse.serving.vllm_plugin``), which scales rank block i by each request's w_i between
        vLLM's shrink and expand: ``y = W x + (alpha/r) B_cat diag(w ⊗ 1_r) A_cat x``. Loaded
        without the plugin (or sent without weights) it would apply every expert at full strength,
        so ``personafuse_mixture.json`` marks it ``"stack": true`` and the plugin refuses such
        requests."""
        return export.export_stack(self, directory)
