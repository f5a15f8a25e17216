"""An ``lmms-eval`` model that runs a pruned Hugging Face MLLM, so MMStar, MME, GQA ... can be scored with pruning.

Tested with lmms-eval 0.7.3 (``tests/test_lmms_eval.py``: the local task of :mod:`.lmms_task` through
``simple_evaluate`` and through the command line). Generation tasks with images only (``generate_until``);
``loglikelihood`` and multi-round tasks raise. Install without replacing your torch: :data:`LMMS_INSTALL`.

Importing this module registers the model with lmms-eval as ``hf_tokenprune`` (the plain ``lmms-eval`` command does
not import it, so it does not know the name). lmms-eval's command line with that import done first::

    python -m hf_tokenprune.bench.lmms_wrapper --model hf_tokenprune \\
        --model_args pretrained=Qwen/Qwen2-VL-2B-Instruct,ratio=0.25 --tasks mmstar --batch_size 1

From Python::

    from lmms_eval.evaluator import simple_evaluate
    from hf_tokenprune.bench.lmms_wrapper import TokenPruneLMM

    lm = TokenPruneLMM("Qwen/Qwen2-VL-2B-Instruct", ratio=0.25)
    results = simple_evaluate(model=lm, tasks=["mmstar"])
    lm.stats  # the PruneStats of every answered request
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoProcessor, ProcessorMixin

from .. import tiny  # noqa: F401  (AutoProcessor reloads the tiny and real-weights test models' processors)
from ..config import TokenPruneConfig
from ..stats import PruneStats
from ..wrap import from_pretrained

# lmms-eval's own requirements pull a CUDA torch and torchvision: the `lmms` extra installs what its evaluation
# imports, then lmms-eval goes in without its requirements
LMMS_INSTALL = 'pip install -e ".[lmms]" (in the hf_tokenprune checkout) && pip install --no-deps lmms-eval==0.7.3'

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.models.registry_v2 import ModelManifest
    from loguru import logger
except ImportError as error:  # pragma: no cover - exercised only without lmms-eval
    raise ImportError(f"hf_tokenprune.bench.lmms_wrapper needs lmms-eval (pip install lmms-eval; to keep your "
                      f"torch: {LMMS_INSTALL})") from error

PRUNING_ARGS = {f.name for f in fields(TokenPruneConfig)}


class TokenPruneLMM(lmms):
    """``pretrained`` (Hub id or directory) loaded with ``AutoModelForImageTextToText`` and pruned to ``ratio`` of
    its visual tokens. The other :class:`~hf_tokenprune.TokenPruneConfig` fields (``scorer``, ``compressor``,
    ``budget``, ``layer`` ...) may be given too; anything else goes to ``from_pretrained`` (e.g.
    ``attn_implementation``). ``device`` None: this process's GPU (``LOCAL_RANK``) if there is one, else the CPU.
    One request at a time (``batch_size`` 1)."""

    def __init__(self, pretrained: str, ratio: float = 0.25, device: str | None = None, dtype: str = "auto",
                 batch_size: int | str = 1, max_new_tokens: int = 128, **kwargs: Any) -> None:
        super().__init__()

        if int(batch_size) != 1:
            raise ValueError(f"hf_tokenprune's lmms-eval model answers one request at a time: batch_size must be 1, "
                             f"got {batch_size!r}")
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        pruning = {k: kwargs.pop(k) for k in PRUNING_ARGS & set(kwargs)}
        config = TokenPruneConfig(ratio=ratio, **pruning)
        self.model = from_pretrained(pretrained, ratio=ratio, config=config, dtype=dtype, device_map=device, **kwargs)
        self.processor = AutoProcessor.from_pretrained(pretrained)
        if not isinstance(self.processor, ProcessorMixin):
            raise ValueError(f"AutoProcessor found no multimodal processor for {pretrained!r}, only a "
                             f"{type(self.processor).__name__}")
        self.max_new_tokens = int(max_new_tokens)
        self.stats: list[PruneStats | None] = []

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _answer(self, context: str, images: list[Image.Image], gen_kwargs: dict[str, Any]) -> str:
        content: list[dict[str, str]] = [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": context.replace("<image>", "").strip()})
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=False)
        inputs = self.processor(text=[text], images=images or None, return_tensors="pt").to(self.model.device)
        temperature = float(gen_kwargs.get("temperature") or 0)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        self.model.tokenprune.last_stats = None
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=int(gen_kwargs.get("max_new_tokens")
                                                                   or self.max_new_tokens), **sampling)
        self.stats.append(self.model.tokenprune.last_stats)
        answer = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        until = gen_kwargs.get("until") or []
        for stop in [until] if isinstance(until, str) else until:
            answer = answer.split(stop)[0] if stop else answer
        return answer.strip()

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers, start = [], len(self.stats)
        for request in tqdm(requests, disable=self.rank != 0, desc="hf_tokenprune"):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = list(doc_to_visual(self.task_dict[task][split][doc_id]) or [])
            if not all(isinstance(v, Image.Image) for v in visuals):
                raise NotImplementedError(f"hf_tokenprune's lmms-eval model takes images only; task {task!r} gave "
                                          f"{sorted({type(v).__name__ for v in visuals})}")
            answers.append(self._answer(context, visuals, dict(gen_kwargs or {})))
        pruned = [s for s in self.stats[start:] if s is not None]
        logger.info(f"hf_tokenprune: {len(pruned)} of {len(requests)} requests pruned, "
                    f"{sum(sum(s.visual_tokens_after) for s in pruned)} of "
                    f"{sum(sum(s.visual_tokens_before) for s in pruned)} visual tokens kept")
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("hf_tokenprune's lmms-eval model supports generation tasks only")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("hf_tokenprune's lmms-eval model supports single-round generation tasks only")


MODEL_REGISTRY_V2.register_manifest(ModelManifest("hf_tokenprune", simple_class_path=f"{__name__}.TokenPruneLMM"),
                                    overwrite=True)

if __name__ == "__main__":
    from lmms_eval.cli.dispatch import main

    main()
