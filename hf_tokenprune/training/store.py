"""Label store: per-sample features and oracle relevance in safetensors shards, written crash-safely per rank.

Layout of a label directory::

    labels-r000-000000.safetensors   # rank 0, first committed shard
    labels-r000-000001.safetensors
    labels-r001-000000.safetensors   # rank 1
    index.json                       # written by merge_index() once all ranks are done

A shard holds, for every kept sample ``s`` (key ``q = urllib.parse.quote(s, safe="")``, so ids may contain any
character, ``/`` included), the tensors ``{q}/feature``, ``{q}/relevance`` and ``{q}/grid``. Its safetensors
metadata holds JSON strings: ``format``, ``header`` (the run's description, identical across ranks, e.g.
``model_type``, ``model_name``, ``feature``), ``records`` (``[[sample_id, meta], ...]``) and ``skips``
(``[[sample_id, reason, meta], ...]``). A shard is written to a temporary file, fsynced and renamed into place,
so it is either fully there or not at all: a killed writer loses only what it had not flushed.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..atomic import write_atomic

__all__ = ["FORMAT", "LabelRecord", "LabelWriter", "load_records", "merge_index", "read_index", "read_labels"]

FORMAT = "hf_tokenprune.labels/1"
INDEX_NAME = "index.json"
_SHARD_RE = re.compile(r"^labels-r(\d+)-(\d+)\.safetensors$")
_TENSORS = ("feature", "relevance", "grid")


@dataclass
class LabelRecord:
    """One labelled sample.

    Args:
        sample_id: unique, stable id of the dataset sample (any non-empty string).
        feature: float32 ``[N_v]`` first-layer attention ``A^0_v``, or ``[K, N_v]`` (first ``K`` layers).
        relevance: float32 ``[N_v]`` oracle relevance ``R_v`` (finite, >= 0, not all 0).
        grid: int64 ``[U, 3]`` per visual unit (image / video) its ``(t, h, w)`` token grid at the LLM input, or
            ``[U, 1]`` token counts for a family without a grid; informational.
        meta: JSON-serialisable dict: question, reference answer, prediction, ...
    """

    sample_id: str
    feature: torch.Tensor
    relevance: torch.Tensor
    grid: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.sample_id, str) or not self.sample_id:
            raise ValueError(f"sample_id must be a non-empty str, got {self.sample_id!r}")
        self.feature = self.feature.detach().to("cpu", torch.float32).contiguous()
        self.relevance = self.relevance.detach().to("cpu", torch.float32).contiguous()
        self.grid = self.grid.detach().to("cpu", torch.int64).contiguous()
        n = self.relevance.shape[-1] if self.relevance.dim() == 1 else -1
        if n < 1 or self.feature.dim() not in (1, 2) or self.feature.shape[-1] != n or not self.feature.numel():
            raise ValueError(f"sample {self.sample_id!r}: relevance must be [N_v] and feature [N_v] or [K, N_v], "
                             f"got {tuple(self.relevance.shape)} and {tuple(self.feature.shape)}")
        if not (torch.isfinite(self.feature).all() and torch.isfinite(self.relevance).all()):
            raise ValueError(f"sample {self.sample_id!r}: feature and relevance must be finite")
        if bool((self.relevance < 0).any()) or not self.relevance.sum() > 0:
            raise ValueError(f"sample {self.sample_id!r}: relevance must be >= 0 with a positive sum")
        if self.grid.dim() != 2 or self.grid.shape[1] not in (1, 3):
            raise ValueError(f"sample {self.sample_id!r}: grid must be [U, 3] or [U, 1], got {tuple(self.grid.shape)}")
        json.dumps(self.meta)  # fail now, not at flush time


def _shards(directory: Path, rank: int | None = None) -> list[Path]:
    """Committed shards, sorted by (rank, sequence number)."""
    found = []
    for path in directory.glob("labels-r*.safetensors"):
        m = _SHARD_RE.match(path.name)
        if m and (rank is None or int(m.group(1)) == rank):
            found.append((int(m.group(1)), int(m.group(2)), path))
    return [p for *_, p in sorted(found)]


def _shard_info(path: Path) -> dict[str, Any]:
    """A shard's header, kept ids with their meta, and skips, from its metadata (no tensor is read)."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a label shard of format {FORMAT} (format={metadata.get('format')!r})")
    return {"header": json.loads(metadata["header"]), "records": json.loads(metadata["records"]),
            "skips": json.loads(metadata["skips"])}


class LabelWriter:
    """Buffers records and skips of one rank and commits them as shards of at most ``shard_size`` records.

    Re-opening a directory resumes: :meth:`processed_ids` lists what this rank already committed, and new shards
    continue its numbering. ``header`` must equal the header of the rank's committed shards. ``label_count``: the
    records (labels) this rank has committed, earlier runs' included.
    """

    def __init__(self, out_dir: str | os.PathLike, *, rank: int = 0, shard_size: int = 256,
                 header: dict[str, Any] | None = None) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be an int >= 0, got {rank!r}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.shard_size = rank, shard_size
        self.header = dict(header or {})
        self._header_json = json.dumps(self.header, sort_keys=True)
        self._done: set[str] = set()
        self.label_count = 0
        shards = _shards(self.out_dir, rank)
        for path in shards:
            info = _shard_info(path)
            if info["header"] != json.loads(self._header_json):
                raise ValueError(f"{path} was written with header {info['header']!r}, this writer has "
                                 f"{self.header!r}; use a new directory for a different run")
            self._done.update(r[0] for r in info["records"])
            self._done.update(s[0] for s in info["skips"])
            self.label_count += len(info["records"])
        self._next = int(_SHARD_RE.match(shards[-1].name).group(2)) + 1 if shards else 0
        self._records: list[LabelRecord] = []
        self._skips: list[list[Any]] = []
        self._pending: set[str] = set()

    def processed_ids(self) -> set[str]:
        """Ids this rank has committed, kept or skipped."""
        return set(self._done)

    def _claim(self, sample_id: str) -> None:
        if sample_id in self._done or sample_id in self._pending:
            raise ValueError(f"sample {sample_id!r} was already stored by this rank")
        self._pending.add(sample_id)

    def add(self, record: LabelRecord) -> None:
        """Buffer a kept sample; commits a shard once ``shard_size`` records are buffered."""
        self._claim(record.sample_id)
        self._records.append(record)
        if len(self._records) >= self.shard_size:
            self.flush()

    def skip(self, sample_id: str, reason: str, meta: dict[str, Any] | None = None) -> None:
        """Record that a sample gives no label. ``reason`` is a short category (``"wrong_answer"``, ``"error"``)
        that :func:`merge_index` counts; details go in ``meta``."""
        if not isinstance(sample_id, str) or not sample_id:
            raise ValueError(f"sample_id must be a non-empty str, got {sample_id!r}")
        json.dumps(meta)
        self._claim(sample_id)
        self._skips.append([sample_id, str(reason), meta or {}])

    def flush(self) -> None:
        """Commit everything buffered as one shard (atomically); no-op when nothing is buffered."""
        if not self._records and not self._skips:
            return
        tensors = {f"{quote(r.sample_id, safe='')}/{name}": getattr(r, name)
                   for r in self._records for name in _TENSORS}
        metadata = {"format": FORMAT, "header": self._header_json,
                    "records": json.dumps([[r.sample_id, r.meta] for r in self._records]),
                    "skips": json.dumps(self._skips)}
        write_atomic(self.out_dir / f"labels-r{self.rank:03d}-{self._next:06d}.safetensors",
                      save(tensors, metadata=metadata))
        self._next += 1
        self.label_count += len(self._records)
        self._done |= self._pending
        self._records, self._skips, self._pending = [], [], set()

    def close(self) -> None:
        """Flush what is buffered."""
        self.flush()

    def __enter__(self) -> LabelWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _scan(directory: Path) -> dict[str, Any]:
    """The index of all committed shards; raises on duplicate ids or differing headers."""
    shards = _shards(directory)
    if not shards:
        raise FileNotFoundError(f"no label shards (labels-r*.safetensors) in {directory}")
    header, seen, entries, reasons = None, {}, [], Counter()
    kept: list[str] = []
    for path in shards:
        info = _shard_info(path)
        if header is None:
            header, first = info["header"], path
        elif info["header"] != header:
            keys = sorted(k for k in header.keys() | info["header"].keys()
                          if header.get(k) != info["header"].get(k))
            raise ValueError(f"label shards disagree on the header ({', '.join(keys)}): {first.name} has "
                             f"{ {k: header.get(k) for k in keys} }, {path.name} has "
                             f"{ {k: info['header'].get(k) for k in keys} }")
        ids = [r[0] for r in info["records"]] + [s[0] for s in info["skips"]]
        for sample_id in ids:
            if sample_id in seen:
                raise ValueError(f"sample {sample_id!r} is stored twice: in {seen[sample_id]} and {path.name}")
            seen[sample_id] = path.name
        kept += [r[0] for r in info["records"]]
        reasons.update(s[1] for s in info["skips"])
        entries.append({"file": path.name, "records": len(info["records"]), "skips": len(info["skips"])})
    counts = {"kept": len(kept), "skipped": sum(reasons.values()), "skip_reasons": dict(sorted(reasons.items()))}
    return {"format": FORMAT, "header": header, "shards": entries, "counts": counts, "sample_ids": sorted(kept)}


def merge_index(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Check the shards of all ranks and write ``index.json``: format, header, shards, counts (kept, skipped,
    per skip reason) and the sorted kept sample ids. Returns the index.

    Raises:
        ValueError: a sample id is stored twice (by two ranks, or kept and skipped) or the headers differ.
    """
    directory = Path(out_dir)
    index = _scan(directory)
    write_atomic(directory / INDEX_NAME, json.dumps(index, indent=1).encode())
    return index


def read_index(path: str | os.PathLike) -> dict[str, Any]:
    """``index.json`` of a label directory (``path`` is the directory or the file), or, without one, the same
    dict built from all committed shards."""
    path = Path(path)
    if path.is_file():
        return json.loads(path.read_text())
    if (path / INDEX_NAME).is_file():
        return json.loads((path / INDEX_NAME).read_text())
    return _scan(path)


def read_labels(path: str | os.PathLike) -> list[LabelRecord]:
    """All kept records of a label directory (or its ``index.json``), in sorted ``sample_id`` order."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    index = read_index(path)
    unindexed = {p.name for p in _shards(directory)} - {entry["file"] for entry in index["shards"]}
    if unindexed:
        warnings.warn(f"{directory}: {len(unindexed)} shard(s) are not in {INDEX_NAME} (a run resumed after the "
                      "index was written?) and are not read; run merge_index() to include them", stacklevel=2)
    records = []
    for entry in index["shards"]:
        shard = directory / entry["file"]
        info = _shard_info(shard)
        with safe_open(str(shard), "pt") as f:
            for sample_id, meta in info["records"]:
                q = quote(sample_id, safe="")
                records.append(LabelRecord(sample_id, *(f.get_tensor(f"{q}/{n}") for n in _TENSORS), meta=meta))
    return sorted(records, key=lambda r: r.sample_id)


def load_records(labels: str | os.PathLike | Sequence[LabelRecord]) -> tuple[list[LabelRecord], dict[str, Any]]:
    """Records (sorted by ``sample_id``) and a label summary: the store's header and counts when ``labels`` is a
    label directory (or its ``index.json``), an empty header when it is the records themselves."""
    if isinstance(labels, (str, os.PathLike)):
        index = read_index(labels)
        return read_labels(labels), {"header": index["header"], "counts": index["counts"]}
    records = sorted(labels, key=lambda r: r.sample_id)
    return records, {"header": {}, "counts": {"kept": len(records)}}
