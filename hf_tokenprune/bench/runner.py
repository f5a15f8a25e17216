"""``hf-tokenprune bench``: cost and accuracy cells (method x retention) into a resumable ``results.json``, then the
markdown tables and plots of :mod:`hf_tokenprune.bench.report`.

Every record has ``part`` (``cost`` / ``accuracy``), ``model``, ``method`` (``full`` for the unpruned model at
ratio 1.0), ``ratio`` (fraction of visual tokens kept), ``accuracy``, ``prefill_flops_ratio``,
``prefill_time_ratio``, ``ttft_ratio``, ``kv_bytes_ratio``, ``scoring_overhead`` (scoring time / full LLM prefill
time), ``peak_mem_bytes``, ``decode_speed_ratio``, ``peak_mem_ratio`` (ratios: median pruned / full of the same
run; None where the part does not measure them) and, under ``cost``, the details with spreads.
"""

from __future__ import annotations

import contextlib
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

from ..adapters import UnsupportedMethodError
from ..config import COMPRESSOR_SCORERS
from ..wrap import prune_wrap, unwrap
from .accuracy import AccuracyTask, world_task
from .cost import full_cost, pruned_cost
from .models import MODELS
from .realweights import MissingPackageError
from .store import ResultStore

COST_METHODS = ("compressor", "attention", "random", "divprune", "cdpruner", "compressor+dpp", "fastv", "pdrop",
                "dart", "tome")  # visionzip: --methods, on a model whose tower it reads (not tiny, LLaVA-OneVision)
ACCURACY_METHODS = ("compressor", "attention", "random", "uniform", "divprune", "cdpruner", "compressor+dpp", "fastv",
                    "pdrop", "dart", "tome")
RATIOS = (0.5, 0.25, 0.125)
QUICK_RATIOS = (0.25,)
WORLD_FAMILIES = ("qwen2_vl", "llava_onevision")
RATIO_KEYS = ("prefill_flops_ratio", "prefill_time_ratio", "ttft_ratio", "kv_bytes_ratio", "decode_speed_ratio",
              "peak_mem_ratio")


@dataclass
class BenchSettings:
    """What one ``bench`` run measures (``quick``: the 25% ratio, 3 repetitions, 4 decode tokens, 32 questions)."""

    models: Sequence[str] = ("qwen2vl-2b-like", "llava-smollm2-dinov2")
    families: Sequence[str] = WORLD_FAMILIES
    cost_methods: Sequence[str] = COST_METHODS
    accuracy_methods: Sequence[str] = ACCURACY_METHODS
    ratios: Sequence[float] = RATIOS
    repeats: int = 5
    decode_tokens: int = 8
    samples: int = 200
    threads: int = 1
    tasks: list[AccuracyTask] = field(default_factory=list)

    @classmethod
    def quick(cls, **overrides: Any) -> BenchSettings:
        return cls(**{"ratios": QUICK_RATIOS, "repeats": 3, "decode_tokens": 4, "samples": 32, **overrides})


def environment(settings: BenchSettings) -> dict[str, Any]:
    """Machine and versions, recorded with every record."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return {"cpu": cpu, "threads": settings.threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0],
            "repeats": settings.repeats, "decode_tokens": settings.decode_tokens}


def _empty(part: str, model: str, method: str, ratio: float) -> dict[str, Any]:
    return {"part": part, "model": model, "method": method, "ratio": ratio, "accuracy": None,
            **{k: None for k in RATIO_KEYS}, "scoring_overhead": None, "peak_mem_bytes": None}


def _cost_record(model: str, description: str, method: str, ratio: float, cost: dict, env: dict) -> dict[str, Any]:
    record = _empty("cost", model, method, ratio)
    for key in (*RATIO_KEYS, "scoring_overhead", "peak_mem_bytes"):
        value = cost[key]
        record[key] = value["median"] if isinstance(value, dict) else value
    return {**record, "description": description, "cost": cost, "env": env}


def _cells(methods: Sequence[str], ratios: Sequence[float]) -> list[tuple[str, float]]:
    return [("full", 1.0)] + [(m, float(r)) for m in methods for r in ratios]


def run_cost(store: ResultStore, name: str, settings: BenchSettings, bar: tqdm) -> None:
    """The cost cells of model ``name`` that ``store`` lacks (the model is built only if one is missing)."""
    cells = [c for c in _cells(settings.cost_methods, settings.ratios) if store.get("cost", name, *c) is None]
    bar.update(len(_cells(settings.cost_methods, settings.ratios)) - len(cells))
    if not cells:
        return
    try:
        bench = MODELS[name]()
    except MissingPackageError as error:
        tqdm.write(f"skipping cost on {name}: {error}")
        bar.update(len(cells))
        return
    env = environment(settings)
    for method, ratio in cells:
        bar.set_description(f"cost {name} {method} {ratio:g}")
        if method == "full":
            cost = full_cost(bench, settings.repeats, settings.decode_tokens)
        else:
            full_peak = store.get("cost", name, "full", 1.0)["peak_mem_bytes"]
            try:
                cost = pruned_cost(bench, method, ratio, settings.repeats, settings.decode_tokens, full_peak)
            except UnsupportedMethodError as error:  # visionzip on a tower it cannot read (DINOv2)
                tqdm.write(f"skipping cost of {method} on {name}: {error}")
                bar.update()
                continue
        store.add(_cost_record(name, bench.description, method, ratio, cost, env))
        bar.update()


def run_accuracy(store: ResultStore, task: AccuracyTask, methods: Sequence[str], ratios: Sequence[float],
                 bar: tqdm) -> None:
    """The accuracy cells of ``task`` that ``store`` lacks; ``compressor`` and ``compressor+dpp`` are skipped
    without a compressor."""
    skipped = [m for m in methods if m in COMPRESSOR_SCORERS] if task.compressor is None else []
    for method in skipped:
        tqdm.write(f"{task.name}: no trained compressor, skipping method {method!r}")
        bar.update(len(ratios))
    methods = [m for m in methods if m not in skipped]
    for method, ratio in _cells(methods, ratios):
        if store.get("accuracy", task.name, method, ratio) is None:
            bar.set_description(f"accuracy {task.name} {method} {ratio:g}")
            if method != "full":
                prune_wrap(task.model, ratio=ratio, scorer=method,
                           compressor=task.compressor if method in COMPRESSOR_SCORERS else None)
            try:
                result = task.evaluate(task.model)
            finally:
                if method != "full":
                    unwrap(task.model)
            store.add({**_empty("accuracy", task.name, method, ratio), **result})
        bar.update()


def world_tasks(families: Sequence[str], samples: int) -> list[AccuracyTask]:
    """The shipped world models among ``families``; the missing ones are reported and skipped."""
    tasks = []
    for family in families:
        try:
            tasks.append(world_task(family, samples))
        except FileNotFoundError as error:
            tqdm.write(f"skipping toy-world accuracy for {family}: {error} (the world models are trained with "
                       "`python -m hf_tokenprune.world.train`)")
    return tasks


def run(out: str | Path, settings: BenchSettings, parts: Sequence[str] = ("cost", "accuracy"),
        progress: bool = True) -> list[dict[str, Any]]:
    """Measure the missing cells into ``out/results.json`` and write ``out/results.md`` (and plots)."""
    from .report import write_report

    torch.set_num_threads(settings.threads)
    out = Path(out)
    store = ResultStore(out / "results.json")
    tasks = list(settings.tasks)
    if "accuracy" in parts:
        tasks += world_tasks(settings.families, settings.samples)
    n_cost = len(settings.models) * len(_cells(settings.cost_methods, settings.ratios)) if "cost" in parts else 0
    n_acc = len(tasks) * len(_cells(settings.accuracy_methods, settings.ratios))
    with tqdm(total=n_cost + n_acc, disable=not progress, unit="cell") as bar:
        if "cost" in parts:
            for name in settings.models:
                run_cost(store, name, settings, bar)
        for task in tasks:
            run_accuracy(store, task, settings.accuracy_methods, settings.ratios, bar)
    write_report(store.records, out)
    return store.records
