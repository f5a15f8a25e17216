"""Cost of one pruning method at one retention against the full model, measured in the same process.

One measurement is one greedy ``generate()`` call of ``1 + decode_tokens`` tokens on the benchmark prompt, with
hooks that read, without changing anything:

* **LLM prefill time**: the text model's first call (decoder layers, pruning hooks included) minus the scorer's own
  time (``PruneStats.scoring_time_s``), i.e. the LLM work alone;
* **time to first token (TTFT)**: from calling ``generate`` to the first token's logits: vision tower, scoring,
  LLM prefill and LM head;
* **decode tokens/s**: the following tokens over the time between the first and the last token's logits;
* **KV-cache bytes after prefill**: the keys and values the prefill left in the cache (read from the cache);
* **scoring time**: ``PruneStats.scoring_time_s`` (A^0_v and the scorer for input-stage methods, the per-stage
  rankings for in-LLM ones);
* **VisionZip's vision attention** (``visionzip`` only, :func:`vision_attention_cost`): the recompute of the vision
  layer's attention from its captured input, timed apart (it is part of the scoring time too), against the vision
  tower's own time and the full LLM prefill.

Full and pruned runs alternate (the order flips every repetition) after one warm-up each; ratios are taken per
repetition (pruned / the full run next to it) and summarised as median, min and max. Prefill FLOPs are counted
analytically (:func:`hf_tokenprune.stats.prefill_flops`, decoder layers only, per-layer sequence lengths). Peak
memory comes from one extra untimed run under :class:`~hf_tokenprune.bench.memory.TensorMemory`.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..adapters import get_adapter
from ..adapters.vision_attention import VisionAttentionCapture
from ..compat import output_cache
from ..compressor import Compressor
from ..config import COMPRESSOR_SCORERS
from ..stats import prefill_flops
from ..wrap import prune_wrap, unwrap
from .memory import TensorMemory
from .models import BenchModel


@dataclass
class Run:
    """One generate call."""

    llm_prefill_s: float
    ttft_s: float
    decode_tokens_per_s: float
    kv_bytes: int
    scoring_s: float


class _Stamps(LogitsProcessor):
    """Records the time at which each new token's logits are ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.times.append(time.perf_counter())
        return scores


def cache_bytes(cache: Any) -> int:
    """Bytes of the keys and values held by a transformers cache (a linear-attention layer's conv and recurrent
    states have a constant size, whatever the length, and are not counted)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor))


class _PrefillProbe:
    """Hooks on the text model timing its first call and reading the cache that call filled."""

    def __init__(self, text_model: torch.nn.Module) -> None:
        self.start: float | None = None
        self.seconds: float | None = None
        self.kv_bytes = 0
        self._hooks = [text_model.register_forward_pre_hook(self._before, prepend=True),
                       text_model.register_forward_hook(self._after, with_kwargs=True)]

    def _before(self, module, args) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def _after(self, module, args, kwargs, output) -> None:
        if self.seconds is None:
            self.seconds = time.perf_counter() - self.start
            cache = output_cache(output)
            self.kv_bytes = cache_bytes(cache) if cache is not None else 0

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def generate_once(bench: BenchModel, decode_tokens: int, pruned: bool = False) -> Run:
    """Time one greedy generate of ``1 + decode_tokens`` tokens (``pruned``: the model is wrapped and enabled)."""
    model = bench.model
    probe, stamps = _PrefillProbe(get_adapter(model).text_model), _Stamps()
    n = 1 + decode_tokens
    try:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**bench.inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           logits_processor=LogitsProcessorList([stamps]))
    finally:
        probe.remove()
    scoring = model.tokenprune.last_stats.scoring_time_s if pruned else 0.0
    times = stamps.times
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return Run(probe.seconds - scoring, times[0] - start, decode, probe.kv_bytes, scoring)


def peak_memory(bench: BenchModel) -> int:
    """Peak working tensor memory (bytes) of a generate of 2 tokens."""
    with TensorMemory() as memory, torch.no_grad():
        bench.model.generate(**bench.inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    return memory.peak


def method_config(method: str, bench: BenchModel, ratio: float) -> dict[str, Any]:
    """``prune_wrap`` arguments of a benchmark method. ``compressor`` and ``compressor+dpp`` get an UNTRAINED
    compressor of the paper's architecture (same cost as a trained one)."""
    config: dict[str, Any] = {"ratio": ratio, "scorer": method}
    if method in COMPRESSOR_SCORERS:
        config["compressor"] = Compressor(base_model_type=bench.model.config.model_type)
    return config


def vision_attention_cost(bench: BenchModel, repeats: int) -> dict[str, dict[str, float]]:
    """Seconds of VisionZip's vision-attention recompute (:meth:`~hf_tokenprune.adapters.Adapter.vision_attention`
    on the layer input captured during an unpruned forward) and of the vision tower in that forward, over
    ``repeats`` forwards after a warm-up."""
    model = bench.model
    adapter = get_adapter(model)
    tower = getattr(adapter.multimodal_model, "visual", None) or adapter.multimodal_model.vision_tower
    device = next(model.parameters()).device

    def stamp(*_: Any) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    stamps: list[float] = []
    capture = VisionAttentionCapture(adapter.vision_attention_layer(), lambda: True)
    hooks = [tower.register_forward_pre_hook(stamp), tower.register_forward_hook(stamp)]
    towers, recomputes = [], []
    try:
        for _ in range(repeats + 1):
            stamps.clear()
            with torch.no_grad():
                model(**bench.inputs)
            records = capture.take()
            stamp()
            adapter.vision_attention(records, bench.inputs)
            stamp()
            towers.append(stamps[1] - stamps[0])
            recomputes.append(stamps[3] - stamps[2])
    finally:
        capture.remove()
        for hook in hooks:
            hook.remove()
    return {"vision_attention_s": _summary(recomputes[1:]), "vision_tower_s": _summary(towers[1:])}


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def full_cost(bench: BenchModel, repeats: int, decode_tokens: int) -> dict[str, Any]:
    """Absolute figures of the unpruned model (the 100% row): medians over ``repeats`` runs."""
    model = bench.model
    if "tokenprune" in model.__dict__:
        unwrap(model)
    generate_once(bench, decode_tokens)  # warm-up
    runs = [generate_once(bench, decode_tokens) for _ in range(repeats)]
    text_config = model.config.get_text_config()
    length = bench.inputs["input_ids"].shape[1]
    return {
        "prefill_flops": prefill_flops(text_config, bench.inputs["input_ids"].shape[0], length),
        "llm_prefill_s": _summary([r.llm_prefill_s for r in runs]), "ttft_s": _summary([r.ttft_s for r in runs]),
        "decode_tokens_per_s": _summary([r.decode_tokens_per_s for r in runs]), "kv_bytes": runs[0].kv_bytes,
        "peak_mem_bytes": peak_memory(bench), "seq_len": length, "prefill_flops_ratio": 1.0,
        "prefill_time_ratio": 1.0, "ttft_ratio": 1.0, "kv_bytes_ratio": 1.0, "scoring_overhead": 0.0,
        "peak_mem_ratio": 1.0, "decode_speed_ratio": 1.0,
    }


def pruned_cost(bench: BenchModel, method: str, ratio: float, repeats: int, decode_tokens: int,
                full_peak_mem: int | None = None) -> dict[str, Any]:
    """Cost of ``method`` at retention ``ratio``, full and pruned runs alternating (module doc)."""
    model = prune_wrap(bench.model, **method_config(method, bench, ratio))
    try:
        handle = model.tokenprune
        generate_once(bench, decode_tokens, pruned=True)  # warm-up at the pruned length
        pairs = []
        for r in range(repeats):
            runs = {}
            for mode in (("full", "pruned") if r % 2 == 0 else ("pruned", "full")):
                if mode == "full":
                    with handle.disabled():
                        runs[mode] = generate_once(bench, decode_tokens)
                else:
                    runs[mode] = generate_once(bench, decode_tokens, pruned=True)
                    stats = handle.last_stats
            pairs.append((runs["full"], runs["pruned"]))
        peak = peak_memory(bench)
        if full_peak_mem is None:
            with handle.disabled():
                full_peak_mem = peak_memory(bench)
    finally:
        unwrap(model)
    full_prefill = statistics.median(f.llm_prefill_s for f, _ in pairs)
    extra: dict[str, Any] = {}
    if method == "visionzip":
        extra = vision_attention_cost(bench, repeats)
        recompute = extra["vision_attention_s"]["median"]
        extra.update(vision_attention_overhead=recompute / full_prefill,
                     vision_attention_vs_tower=recompute / extra["vision_tower_s"]["median"])
    return {
        **extra,
        "prefill_flops": stats.prefill_flops_after, "prefill_flops_ratio": stats.prefill_flops_ratio,
        "prefill_time_ratio": _summary([p.llm_prefill_s / f.llm_prefill_s for f, p in pairs]),
        "ttft_ratio": _summary([p.ttft_s / f.ttft_s for f, p in pairs]),
        "decode_speed_ratio": _summary([p.decode_tokens_per_s / f.decode_tokens_per_s for f, p in pairs]),
        "kv_bytes": pairs[0][1].kv_bytes, "kv_bytes_ratio": pairs[0][1].kv_bytes / pairs[0][0].kv_bytes,
        "kv_bytes_ratio_analytic": stats.kv_cache_ratio,
        "scoring_s": _summary([p.scoring_s for _, p in pairs]),
        "scoring_overhead": statistics.median(p.scoring_s for _, p in pairs) / full_prefill,
        "peak_mem_bytes": peak, "peak_mem_ratio": peak / full_peak_mem,
        "llm_prefill_s": _summary([p.llm_prefill_s for _, p in pairs]),
        "full_llm_prefill_s": _summary([f.llm_prefill_s for f, _ in pairs]),
        "ttft_s": _summary([p.ttft_s for _, p in pairs]), "full_ttft_s": _summary([f.ttft_s for f, _ in pairs]),
        "decode_tokens_per_s": _summary([p.decode_tokens_per_s for _, p in pairs]),
        "visual_tokens": [stats.visual_tokens_before[0], stats.visual_tokens_after[0]],
        "seq_len": [stats.seq_len_before, stats.seq_len_after],
        "stages": [[s.layer, s.seq_len] for s in stats.stages],
    }
