"""vLLM's offline engine (``pip install 'personafuse[vllm]'``) for large teacher runs on a GPU node:
concurrent requests are gathered into large batches for ``LLM.chat``."""

from __future__ import annotations

import importlib.util
import time
from typing import Any

from personafuse.backends.base import VLLM, BackendError, Completion, GenParams, Messages
from personafuse.backends.local_hf import Batcher


class VLLMBackend:
    capabilities = VLLM

    def __init__(self, model_id: str, *, max_batch: int = 512, **engine_kw: Any):
        if importlib.util.find_spec("vllm") is None:
            raise BackendError("vllm: teachers need vLLM on a GPU machine: pip install 'personafuse[vllm]'")
        from vllm import LLM, SamplingParams

        self._sampling = SamplingParams
        self.llm = LLM(model=model_id, **engine_kw)
        self._gen = Batcher(self.generate_batch, max_batch)

    async def complete(self, messages: Messages, params: GenParams) -> Completion:
        return await self._gen.submit(params, messages)

    def generate_batch(self, params: GenParams, batch: list[Messages]) -> list[Completion]:
        t0 = time.perf_counter()
        sp = self._sampling(max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p)
        outs = self.llm.chat(batch, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        res = []
        for o in outs:
            c = o.outputs[0]
            res.append(Completion(c.text, "length" if c.finish_reason == "length" else "stop", dt,
                                  len(o.prompt_token_ids or []), len(c.token_ids or [])))
        return res
