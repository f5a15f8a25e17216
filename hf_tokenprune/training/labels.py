"""Explainability labels for the compressor (METHOD.md part 1): dataset -> resumable label shards.

For every sample the model answers correctly, a :class:`~hf_tokenprune.training.store.LabelRecord` holds the
compressor's input ``A^0_v`` (first-layer attention, :func:`hf_tokenprune.score_inputs`) and its target ``R_v``
(gradient-weighted relevance, :func:`hf_tokenprune.explain.visual_relevance`; or, with ``relevance="boxes"``,
uniform over the tokens of the sample's annotated evidence boxes, ``meta["boxes"]``:
:func:`hf_tokenprune.explain.box_relevance`).

Decisions:

* The prompt is one user turn: the sample's images, then its video, then the question; generation prompt added.
* The answer is generated greedily by the unpruned model. ``R_v`` is averaged over the generated tokens up to,
  **not including**, the first eos: the end-of-turn token carries the decision to stop, not the answer, and
  would weigh as much as the whole answer for one-word answers. An empty answer is dropped as incorrect.
* A sample whose labelling raises is recorded as ``skip(id, "failed: <ExceptionType>", {"error": "<Type:
  message>", ...})`` (the reason is a category that :func:`merge_index` counts) and the run goes on, unless the
  first ``fail_fast`` samples attempted by a run all fail: that is a broken set-up, not bad samples, so the run
  stops with the error and those samples are not recorded (a fixed rerun retries them).
* Resume: ids the writer already committed (kept, dropped or failed) are skipped. Resume with the same number
  of processes (it is in the header).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import string
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from torch import nn
from tqdm.auto import tqdm

from ..compressor import INFERENCE_FEATURES
from ..explain import AGGREGATIONS, box_relevance, visual_relevance
from ..wrap import score_inputs
from .processes import process_state
from .store import LabelRecord, LabelWriter, load_records, merge_index

Judge = Callable[[str, str], bool]
FEATURES = INFERENCE_FEATURES  # A^0_v, or A^0_v of each head of the first layer ([heads, N_v])
FEATURE = FEATURES[0]
FIELDS = ("id", "question", "answer", "image", "images", "video")
RELEVANCE = ("gradient", "boxes")  # where R_v comes from: the answer's gradients, or the annotated evidence


# -- samples ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LabelSample:
    """One question about one or more images and/or a video (a list of frames), with its reference answer."""

    sample_id: str
    question: str
    answer: str
    images: list[PIL.Image.Image] | None = None
    video: list[PIL.Image.Image] | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def _open_image(value: Any, base_dir: Path | None) -> PIL.Image.Image:
    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, (str, Path)):
        path = base_dir / value if base_dir is not None else Path(value)
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    raise TypeError(f"an image must be a PIL image or a path, got {type(value).__name__}")


def sample_from_dict(row: Mapping[str, Any], index: int, base_dir: str | Path | None = None) -> LabelSample:
    """A :class:`LabelSample` from ``{id?, question, answer, image? | images?, video?, meta?}``.

    Images and video frames are PIL images or paths (relative paths are taken from ``base_dir``); the id
    defaults to the zero-padded row ``index``.
    """
    base = Path(base_dir) if base_dir is not None else None
    images = [_open_image(i, base) for i in (*_items(row.get("images")), *_items(row.get("image")))]
    video = [_open_image(f, base) for f in _items(row.get("video"))]
    return LabelSample(sample_id=_row_id(row, index), question=str(row["question"]), answer=str(row["answer"]),
                       images=images or None, video=video or None, meta=dict(row.get("meta") or {}))


def _items(value: Any) -> list[Any]:
    """``value`` as a list: None -> [], one image or path -> [it]."""
    if value is None:
        return []
    return [value] if isinstance(value, (str, Path, PIL.Image.Image)) else list(value)


def _row_id(row: Mapping[str, Any], index: int) -> str:
    return str(row["id"]) if row.get("id") is not None else f"{index:08d}"


class _Rows(Sequence):
    """A lazy sequence of samples: a row becomes a :class:`LabelSample` (images opened) when it is labelled."""

    def __init__(self, rows: Any, base_dir: Path | None = None, columns: Mapping[str, str] | None = None) -> None:
        self.rows, self.base_dir, self.columns = rows, base_dir, columns

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> LabelSample:
        return self.entry(index)[1]()

    def entry(self, index: int) -> tuple[str, Callable[[], LabelSample]]:
        """``(sample id, loader)`` of row ``index``: the id without opening any image."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        row = self.rows[index]
        if self.columns is not None:
            row = {name: row[column] for name, column in self.columns.items() if column in row}
        return _row_id(row, index), functools.partial(sample_from_dict, row, index, self.base_dir)


def load_jsonl(path: str | Path) -> Sequence[LabelSample]:
    """Samples of a JSONL file, one :func:`sample_from_dict` row a line; paths relative to the file."""
    path = Path(path)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return _Rows(rows, base_dir=path.parent)


def from_dataset(dataset: Any, columns: Mapping[str, str] | None = None) -> Sequence[LabelSample]:
    """Samples of a ``datasets.Dataset`` (or any sequence of row dicts).

    ``columns`` maps the fields of :func:`sample_from_dict` (``id``, ``question``, ``answer``, ``image``,
    ``images``, ``video``) to column names; by default each field is read from the column of its own name.
    """
    return _Rows(dataset, columns={name: name for name in FIELDS} | dict(columns or {}))


def load_samples(spec: str) -> Sequence[LabelSample]:
    """``hf:<dataset>:<split>`` (needs ``datasets``) or a JSONL path."""
    if spec.startswith("hf:"):
        name, _, split = spec[3:].rpartition(":")
        if not name or not split:
            raise ValueError(f"expected hf:<dataset>:<split>, got {spec!r}")
        try:
            import datasets
        except ImportError as error:
            raise ImportError("hf:<dataset>:<split> needs `pip install datasets`") from error
        return from_dataset(datasets.load_dataset(name, split=split))
    return load_jsonl(spec)


# -- judges -----------------------------------------------------------------------------------------------------
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, ASCII punctuation removed, whitespace collapsed."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def normalized_match(prediction: str, reference: str) -> bool:
    """Equal after :func:`normalize_answer` (the default judge)."""
    return normalize_answer(prediction) == normalize_answer(reference)


def exact_match(prediction: str, reference: str) -> bool:
    """Equal up to leading/trailing whitespace."""
    return prediction.strip() == reference.strip()


# -- labelling one sample ---------------------------------------------------------------------------------------
def build_prompt(processor: Any, sample: LabelSample) -> Any:
    """Processor inputs (batch of one) for the chat prompt: images, video, question; generation prompt added."""
    content = [{"type": "image"}] * len(sample.images or []) + [{"type": "video"}] * bool(sample.video)
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": sample.question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    visual: dict[str, Any] = {}
    if sample.images:
        visual["images"] = list(sample.images)
    if sample.video:
        visual["videos"] = [list(sample.video)]
    return processor(text=[text], return_tensors="pt", **visual)


def _unpruned(model: nn.Module) -> contextlib.AbstractContextManager:
    handle = model.__dict__.get("tokenprune")
    return handle.disabled() if handle is not None else contextlib.nullcontext()


def _greedy_answer(model: nn.Module, inputs: Any, max_new_tokens: int) -> torch.Tensor:
    """The generated token ids up to (not including) the first eos."""
    with _unpruned(model), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    generated = out[0, inputs["input_ids"].shape[1]:]
    eos = model.generation_config.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos], device=out.device)
    stop = torch.isin(generated, eos).nonzero()
    return generated[: int(stop[0]) if len(stop) else len(generated)]


def _grid(model: nn.Module, inputs: Any, segments: list[int], count: int) -> torch.Tensor:
    """Qwen: ``[items, 3]`` (t, h, w) token grids of the images then the video; others: ``[segments, 1]``."""
    grids = [inputs[k] for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None]
    if grids:
        grid = torch.cat(grids).to("cpu", torch.int64)
        grid[:, 1:] //= model.config.vision_config.spatial_merge_size
    else:
        grid = torch.tensor(segments, dtype=torch.int64).unsqueeze(1)
    if int(grid.prod(dim=1).sum()) != count:
        raise ValueError(f"token grid {grid.tolist()} does not cover the {count} visual tokens")
    return grid


def _feature(model: nn.Module, inputs: Any, feature: str) -> tuple[torch.Tensor, list[int]]:
    """``feature`` of the sample (``[N_v]``, or ``[heads, N_v]``) and its visual segments."""
    scope = model.tokenprune.config.scope if "tokenprune" in model.__dict__ else "sample"
    found = score_inputs(model, inputs, scope=scope)
    if found is None:
        raise ValueError("the prompt has no visual tokens")
    valid = found.valid[0]
    if feature == FEATURE:
        values = found.first_layer_attention[0, valid]
    else:
        values = found.first_layer_head_attention[0][:, valid]
    return values.detach().float().cpu(), found.layout.segments[0]


def _refeature_one(model: nn.Module, processor: Any, sample: LabelSample, source: LabelRecord,
                   feature: str) -> tuple[LabelRecord, dict[str, Any]]:
    """``source``'s label (``R_v``, grid, meta) with ``feature`` computed anew: no generation, no gradients."""
    values, _ = _feature(model, build_prompt(processor, sample).to(model.device), feature)
    if values.shape[-1] != source.relevance.shape[0]:
        raise ValueError(f"the model gives {values.shape[-1]} visual tokens, the source label has "
                         f"{source.relevance.shape[0]}: another model or processor")
    return LabelRecord(sample.sample_id, values, source.relevance, source.grid, source.meta), source.meta


def _label_one(model: nn.Module, processor: Any, sample: LabelSample, judge: Judge, max_new_tokens: int,
               aggregation: str, relevance_source: str = "gradient",
               feature: str = FEATURE) -> tuple[LabelRecord | None, dict[str, Any]]:
    """``(record, meta)``; ``record`` is None when the answer is wrong (or empty)."""
    inputs = build_prompt(processor, sample).to(model.device)
    answer_ids = _greedy_answer(model, inputs, max_new_tokens)
    prediction = processor.decode(answer_ids, skip_special_tokens=True).strip()
    meta = {**sample.meta, "question": sample.question, "reference": sample.answer, "prediction": prediction}
    if len(answer_ids) == 0 or not judge(prediction, sample.answer):
        return None, meta
    values, segments = _feature(model, inputs, feature)
    if relevance_source == "boxes":
        size = (sample.images or sample.video or [None])[0].size
        relevance = box_relevance(model, inputs, sample.meta.get("boxes") or [], size)
    else:
        relevance = visual_relevance(model, inputs, answer_ids, aggregation=aggregation).detach().float().cpu()
    if relevance.shape != values.shape[-1:]:
        raise ValueError(f"relevance has shape {tuple(relevance.shape)}, feature {tuple(values.shape)}")
    meta |= {"model_type": model.config.model_type, "name_or_path": model.name_or_path}
    grid = _grid(model, inputs, segments, values.shape[-1])
    return LabelRecord(sample.sample_id, values, relevance, grid, meta), meta


# -- the run ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LabelSummary:
    """One run (all processes): ``labels_added`` (samples labelled now), ``dropped`` (wrong answer) and ``failed``
    samples, ``already_done`` (samples an earlier run processed, skipped now), ``labels_total`` (labels in the
    directory after the run, earlier runs' included); ``seconds`` is the run's wall-clock time."""

    labels_added: int = 0
    dropped: int = 0
    failed: int = 0
    already_done: int = 0
    labels_total: int = 0
    seconds: float = 0.0

    @property
    def seconds_per_label(self) -> float | None:
        """Wall-clock seconds per label added (None when none was)."""
        return self.seconds / self.labels_added if self.labels_added else None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "seconds_per_label": self.seconds_per_label}


def _entry(item: LabelSample | Mapping[str, Any], index: int) -> tuple[str, Callable[[], LabelSample]]:
    if isinstance(item, LabelSample):
        return item.sample_id, lambda: item
    return _row_id(item, index), functools.partial(sample_from_dict, item, index)


def _shard(samples: Iterable[Any], rank: int, world_size: int,
           limit: int | None) -> tuple[Iterator[tuple[str, Callable[[], LabelSample]]], int | None]:
    """``(sample id, loader)`` of the samples of this rank (``index % world_size == rank``), and their count if
    known. Only this rank's samples of a sequence are read."""
    if isinstance(samples, Sequence):
        indices = range(rank, len(samples) if limit is None else min(limit, len(samples)), world_size)
        if isinstance(samples, _Rows):
            return (samples.entry(i) for i in indices), len(indices)
        return (_entry(samples[i], i) for i in indices), len(indices)
    pairs = itertools.islice(enumerate(samples), limit)
    return (_entry(item, i) for i, item in pairs if i % world_size == rank), None


def _header(model: nn.Module, judge: Judge, max_new_tokens: int, aggregation: str, relevance: str,
            feature: str) -> dict:
    from .. import __version__

    return {"model_type": model.config.model_type, "name_or_path": model.name_or_path, "feature": feature,
            "relevance": relevance, "aggregation": aggregation,
            "judge": getattr(judge, "__name__", type(judge).__name__),
            "max_new_tokens": max_new_tokens, "answer_tokens": "generated, up to the first eos (excluded)",
            "hf_tokenprune_version": __version__}


def generate_labels(model: nn.Module, processor: Any, samples: Iterable[LabelSample | Mapping[str, Any]],
                    out_dir: str | Path, *, judge: Judge = normalized_match, max_new_tokens: int = 16,
                    shard_size: int = 256, rank: int | None = None, world_size: int | None = None,
                    progress: bool = True, aggregation: str = "grad-weighted", relevance: str = "gradient",
                    limit: int | None = None, fail_fast: int = 8, feature: str = FEATURE,
                    relevance_from: str | Path | None = None) -> LabelSummary:
    """Label ``samples`` (:class:`LabelSample` or :func:`sample_from_dict` dicts) into ``out_dir``; resumable.

    ``feature``: the compressor input stored with each label (:data:`FEATURES`). ``relevance_from``: a label
    directory of the same model whose ``R_v`` are reused: each of its samples gets only the feature computed
    (no generation, no gradients: a new feature for existing labels at a small fraction of the cost); samples it
    has no label for are skipped (counted as dropped); the header keeps its relevance settings.

    Each process labels the samples with ``index % world_size == rank`` (of the first ``limit``). ``rank`` and
    ``world_size`` default to ``accelerate.PartialState()``'s (rank 0 of 1 without ``accelerate launch``);
    there, all processes meet at the end and the main one writes the index (:func:`merge_index`). With an
    explicit ``world_size > 1`` call :func:`merge_index` yourself once every rank is done. Returns the counts
    of all processes (accelerate) or of this one (explicit rank).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if relevance not in RELEVANCE:
        raise ValueError(f"relevance must be one of {RELEVANCE}, got {relevance!r}")
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    header = _header(model, judge, max_new_tokens, aggregation, relevance, feature)
    sources: dict[str, LabelRecord] | None = None
    if relevance_from is not None:
        if Path(relevance_from).resolve() == Path(out_dir).resolve():
            raise ValueError(f"relevance_from and the output are the same directory {str(out_dir)!r}: write the new "
                             "feature's labels to another one")
        records, source = load_records(relevance_from)
        source = source["header"]
        if source.get("model_type") not in (None, header["model_type"]):
            raise ValueError(f"relevance_from {str(relevance_from)!r} labels a {source['model_type']!r} model, "
                             f"this one is {header['model_type']!r}")
        sources = {r.sample_id: r for r in records}
        header |= {k: source[k] for k in ("relevance", "aggregation", "judge", "max_new_tokens") if k in source}
        header["relevance_from"] = str(relevance_from)
    state = None
    if rank is None and world_size is None:
        state = process_state()
        rank, world_size = state.process_index, state.num_processes
    elif rank is None or world_size is None or not 0 <= rank < world_size:
        raise ValueError(f"give both rank and world_size with 0 <= rank < world_size (got {rank}, {world_size})")
    start = time.perf_counter()
    writer = LabelWriter(out_dir, rank=rank, shard_size=shard_size, header={**header, "world_size": world_size})
    done, seen = writer.processed_ids(), set()
    summary, failures, succeeded = LabelSummary(), [], False
    entries, total = _shard(samples, rank, world_size, limit)
    bar = tqdm(entries, total=total, desc=f"labels (rank {rank}/{world_size})",
               disable=not progress or (state is not None and not state.is_local_main_process))
    try:
        for sample_id, load in bar:
            if sample_id in done:
                summary.already_done += 1
                continue
            if sample_id in seen:
                raise ValueError(f"duplicate sample id {sample_id!r}")
            seen.add(sample_id)
            if sources is not None and sample_id not in sources:
                summary.dropped += 1
                writer.skip(sample_id, "no label in relevance_from", {})
                continue
            sample = None
            try:
                sample = load()
                if sources is not None:
                    record, meta = _refeature_one(model, processor, sample, sources[sample_id], feature)
                else:
                    record, meta = _label_one(model, processor, sample, judge, max_new_tokens, aggregation,
                                              relevance, feature)
            except Exception as error:
                summary.failed += 1
                message = f"{type(error).__name__}: {error}"
                context = {"question": sample.question, "reference": sample.answer} if sample else {}
                failures.append((sample_id, f"failed: {type(error).__name__}", {**context, "error": message}))
                if not succeeded and len(failures) >= fail_fast:
                    raise RuntimeError(f"the first {fail_fast} samples all failed; last: {message}") from error
            else:
                succeeded = True
                if record is None:
                    summary.dropped += 1
                    writer.skip(sample_id, "incorrect", meta)
                else:
                    summary.labels_added += 1
                    writer.add(record)
            if succeeded:  # failures are held back until a sample succeeds (see fail_fast)
                for failure in failures:
                    writer.skip(*failure)
                failures.clear()
            bar.set_postfix(labelled=summary.labels_added, dropped=summary.dropped, failed=summary.failed,
                            refresh=False)
        for failure in failures:  # fewer than fail_fast samples, all failed
            writer.skip(*failure)
    finally:
        writer.close()
        bar.close()
    summary.labels_total = writer.label_count
    summary.seconds = time.perf_counter() - start
    if state is None:
        if world_size == 1:
            merge_index(out_dir)
        return summary
    from accelerate.utils import gather_object

    state.wait_for_everyone()
    parts = gather_object([summary])
    if state.is_main_process:
        merge_index(out_dir)
    state.wait_for_everyone()
    counts = [f.name for f in dataclasses.fields(LabelSummary) if f.name != "seconds"]
    return LabelSummary(**{f: sum(getattr(p, f) for p in parts) for f in counts},
                        seconds=max(p.seconds for p in parts))


def label_from_paths(model: str, data: str, out: str | Path, **options: Any) -> LabelSummary:
    """``hf-tokenprune label``: load ``model`` (local dir or Hub id, ``AutoModelForImageTextToText``) and its
    processor, and :func:`generate_labels` for ``data`` (:func:`load_samples`) into ``out`` (``options``: its
    keyword arguments)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .. import tiny  # noqa: F401 - registers the offline tiny processors with AutoProcessor

    loaded = AutoModelForImageTextToText.from_pretrained(model, dtype="auto").to(process_state().device).eval()
    processor = AutoProcessor.from_pretrained(model)
    return generate_labels(loaded, processor, load_samples(data), out, **options)


__all__ = ["FEATURE", "FEATURES", "RELEVANCE", "Judge", "LabelSample", "LabelSummary", "build_prompt", "exact_match",
           "from_dataset", "generate_labels", "label_from_paths", "load_jsonl", "load_samples", "normalize_answer",
           "normalized_match", "process_state", "sample_from_dict"]
