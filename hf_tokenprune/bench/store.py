"""``results.json``: the benchmark's records, one per (part, model, method, ratio), rewritten after every cell so
that an interrupted run resumes where it stopped."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..atomic import write_atomic

Key = tuple[str, str, str, float]


def record_key(record: dict[str, Any]) -> Key:
    return record["part"], record["model"], record["method"], float(record["ratio"])


class ResultStore:
    """The records of ``path`` (a JSON list; created on the first :meth:`add`)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = json.loads(self.path.read_text()) if self.path.exists() else []

    def get(self, part: str, model: str, method: str, ratio: float) -> dict[str, Any] | None:
        key = (part, model, method, float(ratio))
        return next((r for r in self.records if record_key(r) == key), None)

    def add(self, record: dict[str, Any]) -> None:
        """Add (or replace) a record and rewrite the file atomically."""
        key = record_key(record)
        self.records = [r for r in self.records if record_key(r) != key] + [record]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(self.records, indent=1).encode())
