"""An ``lmms-eval`` model that runs a pruned Hugging Face MLLM, so MMStar, MME, GQA ... can be scored with pruning.

UNTESTED in this repository: lmms-eval is not installed here (and its tasks download data). It is written against
lmms-eval's documented model interface (``lmms_eval.api.model.lmms``: ``generate_until`` receives instances
whose ``args`` are ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``; the visuals come from
``doc_to_visual(self.task_dict[task][split][doc_id])``). Generation tasks only: ``loglikelihood`` raises.

Use it from Python (``pip install lmms-eval``)::

    from lmms_eval.evaluator import simple_evaluate
    from hf_tokenprune.bench.lmms_wrapper import TokenPruneLMM

    lm = TokenPruneLMM("Qwen/Qwen2-VL-2B-Instruct", ratio=0.25, scorer="fastv")
    results = simple_evaluate(model=lm, tasks=["mmstar"])

Importing this module registers the model as ``hf_tokenprune`` (``--model hf_tokenprune --model_args
pretrained=...,ratio=0.25,scorer=compressor`` where lmms-eval's CLI has imported it).
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

try:
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model
except ImportError as error:  # pragma: no cover - exercised only without lmms-eval
    raise ImportError("hf_tokenprune.bench.lmms_wrapper needs lmms-eval: pip install lmms-eval") from error

from ..config import TokenPruneConfig
from ..wrap import from_pretrained


@register_model("hf_tokenprune")
class TokenPruneLMM(lmms):
    """``pretrained`` (Hub id or directory) loaded with ``AutoModelForImageTextToText`` and pruned to ``ratio`` of
    its visual tokens by ``scorer`` (``compressor`` needs ``compressor=`` or the model's default Hub repo)."""

    def __init__(self, pretrained: str, ratio: float = 0.25, scorer: str = "compressor",
                 compressor: str | None = None, device: str = "cuda" if torch.cuda.is_available() else "cpu",
                 dtype: str = "auto", max_new_tokens: int = 128, **kwargs: Any) -> None:
        super().__init__()
        from transformers import AutoProcessor

        config = TokenPruneConfig(ratio=float(ratio), scorer=scorer, compressor=compressor)
        self.model = from_pretrained(pretrained, ratio=float(ratio), config=config, dtype=dtype,
                                     device_map=device, **kwargs)
        self.processor = AutoProcessor.from_pretrained(pretrained)
        self.processor.tokenizer.padding_side = "left"
        self.max_new_tokens = int(max_new_tokens)

    def _answer(self, context: str, visuals: list, gen_kwargs: dict[str, Any]) -> str:
        images = [v for v in visuals if v is not None]
        content = [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": context.replace("<image>", "").strip()})
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=False)
        inputs = self.processor(text=[text], images=images or None, return_tensors="pt").to(self.model.device)
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=int(gen_kwargs.get("max_new_tokens",
                                                                                 self.max_new_tokens)), **sampling)
        answer = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        until = gen_kwargs.get("until") or []
        for stop in [until] if isinstance(until, str) else until:
            answer = answer.split(stop)[0] if stop else answer
        return answer.strip()

    def generate_until(self, requests: list) -> list[str]:
        answers = []
        for request in tqdm(requests, disable=self.rank != 0, desc="hf_tokenprune"):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            answers.append(self._answer(context, list(visuals or []), dict(gen_kwargs or {})))
        return answers

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        raise NotImplementedError("hf_tokenprune's lmms-eval wrapper supports generation tasks only")

    def generate_until_multi_round(self, requests: list) -> list[str]:
        raise NotImplementedError("hf_tokenprune's lmms-eval wrapper supports single-round generation tasks only")
