"""A transformers causal LM in this process: loading on a device in a dtype (as every command reads
``--device``/``--dtype``, :mod:`personafuse.devices`), concurrent requests gathered into padded
batches run in a worker thread (dynamic batching), and option scoring by log-likelihood."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from personafuse import chat
from personafuse.backends.base import HF, Completion, GenParams, Messages


def load_hf(path: str, *, gguf_file: str | None = None, dtype: str | None = "auto",
            device: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) on ``device`` (None: the CPU, where it loads) in ``dtype`` as
    :mod:`personafuse.devices` resolves it; a GGUF (no dtype of its own) loads from its converted
    float32 copy, cast to that dtype."""
    from personafuse import devices, embedded

    dev = devices.resolve_device(device) if device else "cpu"
    src = embedded.ModelSource(path, path, gguf_file)
    model = embedded.load_causal_lm(src, devices.resolve_dtype(dtype, dev, devices.source_dtype(path, gguf_file)))
    tok = embedded.load_tokenizer(src)
    if device:
        model.to(dev)
    return model, tok


class Batcher:
    """Gathers concurrent calls with the same key into batches run by ``fn`` in a worker thread."""

    def __init__(self, fn: Callable[[Any, list[Any]], list[Any]], max_batch: int):
        self.fn = fn
        self.max_batch = max_batch
        self.pending: dict[Any, list[tuple[Any, asyncio.Future[Any]]]] = {}
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, key: Any, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._wake is None:
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._run())
        fut: asyncio.Future[Any] = loop.create_future()
        self.pending.setdefault(key, []).append((item, fut))
        self._wake.set()
        return await fut

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            # Let every coroutine that is ready this tick enqueue its request before batching.
            for _ in range(3):
                await asyncio.sleep(0)
            if not any(self.pending.values()):
                self._wake.clear()
                continue
            key = max(self.pending, key=lambda k: len(self.pending[k]))
            batch = self.pending[key][: self.max_batch]
            self.pending[key] = self.pending[key][self.max_batch:]
            if not self.pending[key]:
                del self.pending[key]
            try:
                results = await asyncio.to_thread(self.fn, key, [item for item, _ in batch])
            except BaseException as e:  # noqa: BLE001 - hand the error to every waiting caller
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)


class HFBackend:
    """Batched greedy/sampled chat generation and option scoring on a local causal LM."""

    capabilities = HF

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 8, score_batch: int = 32):
        import torch

        self.torch = torch
        self.model = model.eval()
        self.tok = tokenizer
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.device = next(model.parameters()).device
        # One model call at a time: generation and scoring batches run in worker threads, and two
        # concurrent forwards would only fight over the same cores.
        self._lock = threading.Lock()
        self._gen = Batcher(self._locked(self.generate_batch), max_batch)
        self._score = Batcher(self._locked(self.score_batch), score_batch)
        from personafuse.moe.decoding import cache_kwarg

        self._cache_kw = cache_kwarg(model)

    def _locked(self, fn: Callable[[Any, list[Any]], list[Any]]) -> Callable[[Any, list[Any]], list[Any]]:
        def run(key: Any, items: list[Any]) -> list[Any]:
            with self._lock:
                return fn(key, items)

        return run

    def prompt_text(self, messages: Messages) -> str:
        return chat.prompt_text(self.tok, list(messages))

    async def complete(self, messages: Messages, params: GenParams) -> Completion:
        return await self._gen.submit(params, messages)

    async def score(self, messages: Messages, options: Sequence[str]) -> list[float]:
        futs = [self._score.submit("score", (messages, opt)) for opt in options]
        return list(await asyncio.gather(*futs))

    def generate_batch(self, params: GenParams, batch: list[Messages]) -> list[Completion]:
        torch = self.torch
        t0 = time.perf_counter()
        enc = chat.encode_prompts(self.tok, batch).to(self.device)  # left-padded, the one prompt format
        kw: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "pad_token_id": self.tok.pad_token_id,
                              "repetition_penalty": params.repetition_penalty}
        if params.temperature > 0:
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self.model.generate(**enc, **kw)
        new = out[:, enc["input_ids"].shape[1]:]
        eos_ids = set(chat.eos_token_ids(self.tok, self.model))
        dt = time.perf_counter() - t0
        res = []
        for row, mask in zip(new.tolist(), enc["attention_mask"].tolist(), strict=True):
            stop = next((i for i, t in enumerate(row) if t in eos_ids), None)
            ids = row if stop is None else row[:stop]
            res.append(Completion(
                self.tok.decode(ids, skip_special_tokens=True).strip(),
                "length" if stop is None else "stop",
                dt,
                int(sum(mask)),
                len(ids),
            ))
        return res

    def score_batch(self, _key: str, items: list[tuple[Messages, str]]) -> list[float]:
        # Options that share a prompt are scored from one cached prefix: the prompt runs once and
        # only the short option tokens run per option (about 5x less compute than full sequences).
        groups: dict[str, list[int]] = {}
        for i, (messages, _) in enumerate(items):
            groups.setdefault(self.prompt_text(messages), []).append(i)
        out = [0.0] * len(items)
        for prompt, idx in groups.items():
            for i, s in zip(idx, self._score_group(prompt, [items[i][1] for i in idx]), strict=True):
                out[i] = s
        return out

    def _score_group(self, prompt: str, options: list[str]) -> list[float]:
        from personafuse.moe import decoding

        torch = self.torch
        p = self.tok(prompt, add_special_tokens=chat.adds_special_tokens(self.tok))["input_ids"]
        opts = [self.tok(o, add_special_tokens=False)["input_ids"] for o in options]
        n, width = len(opts), max(len(o) for o in opts)
        pad = self.tok.pad_token_id
        with torch.inference_mode():
            pre = self.model(input_ids=torch.tensor([p], device=self.device), use_cache=True)
            cache = decoding.output_cache(pre)
            cache.batch_repeat_interleave(n)
            ids = torch.tensor([o + [pad] * (width - len(o)) for o in opts], device=self.device)
            # right padding: pads come after every real token, so they never affect the scores
            mask = torch.ones(n, len(p) + width, dtype=torch.long, device=self.device)
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=True, **{self._cache_kw: cache}).logits
        first = torch.log_softmax(pre.logits[0, -1].float(), -1)  # predicts each option's first token
        logp = torch.log_softmax(logits.float(), -1)
        res = []
        for i, o in enumerate(opts):
            if not o:
                res.append(float("-inf"))
                continue
            total = first[o[0]] + sum((logp[i, t - 1, o[t]] for t in range(1, len(o))), torch.tensor(0.0))
            res.append(float(total) / len(o))
        return res
