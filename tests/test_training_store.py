"""Label store: round trip, crash-safe resume, merging ranks, refusal of duplicates and mixed runs."""

import json
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hf_tokenprune.training.store import LabelRecord, LabelWriter, merge_index, read_index, read_labels

HEADER = {"model_type": "qwen2_vl", "model_name": "Qwen/Qwen2-VL-2B-Instruct", "feature": "first_layer_attention"}
ODD_IDS = ["a/b", "x%2Fy", "ünï cødé 🙂", "../escape", "q?=&#", "  spaced  "]


def record(sample_id: str, n: int = 5, layers: int | None = None) -> LabelRecord:
    g = torch.Generator().manual_seed(zlib.crc32(sample_id.encode()))
    shape = (n,) if layers is None else (layers, n)
    return LabelRecord(sample_id, torch.rand(shape, generator=g), torch.rand(n, generator=g) + 0.01,
                       torch.tensor([[1, 1, n]]), {"question": f"q {sample_id}", "answer": "yes"})


def assert_same(a: LabelRecord, b: LabelRecord) -> None:
    assert a.sample_id == b.sample_id and a.meta == b.meta
    for name in ("feature", "relevance", "grid"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_round_trip_with_odd_ids(tmp_path: Path) -> None:
    records = [record(s, n=3 + i) for i, s in enumerate(ODD_IDS)] + [record("multi", n=4, layers=3)]
    with LabelWriter(tmp_path, header=HEADER, shard_size=3) as writer:
        for r in records:
            writer.add(r)
        writer.skip("wrong one", "wrong_answer", {"prediction": "no"})
    assert len(list(tmp_path.glob("labels-r000-*.safetensors"))) == 3
    assert not list(tmp_path.glob(".*tmp"))
    loaded = read_labels(tmp_path)  # without an index: from the shards
    assert [r.sample_id for r in loaded] == sorted(r.sample_id for r in records)
    for a in loaded:
        assert_same(a, next(r for r in records if r.sample_id == a.sample_id))
    assert loaded[0].feature.dtype == torch.float32 and loaded[0].grid.dtype == torch.int64
    with safe_open(str(sorted(tmp_path.glob("*.safetensors"))[0]), "pt") as f:
        assert "a%2Fb/feature" in set(f.keys()) and json.loads(f.metadata()["header"]) == HEADER


def test_kill_loses_only_uncommitted_work_and_resume_never_duplicates(tmp_path: Path) -> None:
    writer = LabelWriter(tmp_path, header=HEADER, shard_size=100)
    for i in range(3):
        writer.add(record(f"s{i}"))
    writer.skip("s3", "error", {"message": "CUDA OOM"})
    writer.flush()
    writer.add(record("s4"))
    writer.skip("s5", "wrong_answer")
    (tmp_path / ".labels-r000-000001.safetensors.tmp").write_bytes(b"half a shard")  # killed mid-write
    del writer  # killed: never closed

    writer = LabelWriter(tmp_path, header=HEADER, shard_size=100)
    assert writer.processed_ids() == {"s0", "s1", "s2", "s3"}
    assert [r.sample_id for r in read_labels(tmp_path)] == ["s0", "s1", "s2"]
    with pytest.raises(ValueError, match="already stored"):
        writer.add(record("s1"))
    for i in range(4, 6):
        writer.add(record(f"s{i}"))
    writer.close()
    index = merge_index(tmp_path)
    assert index["sample_ids"] == ["s0", "s1", "s2", "s4", "s5"]
    assert index["counts"] == {"kept": 5, "skipped": 1, "skip_reasons": {"error": 1}}
    assert [s["file"] for s in index["shards"]] == ["labels-r000-000000.safetensors", "labels-r000-000001.safetensors"]


def test_resume_with_another_header_is_refused(tmp_path: Path) -> None:
    with LabelWriter(tmp_path, header=HEADER) as writer:
        writer.add(record("a"))
    with pytest.raises(ValueError, match="header"):
        LabelWriter(tmp_path, header={**HEADER, "model_type": "llava"})


def test_merge_two_ranks(tmp_path: Path) -> None:
    ids = [f"sample-{i:02d}" for i in range(10)]
    for rank in (0, 1):
        with LabelWriter(tmp_path, rank=rank, header=HEADER, shard_size=2) as writer:
            for s in ids[rank::2]:
                if s == "sample-07":
                    writer.skip(s, "wrong_answer")
                else:
                    writer.add(record(s))
    index = merge_index(tmp_path)
    assert index["header"] == HEADER
    assert index["sample_ids"] == [s for s in ids if s != "sample-07"]
    assert index["counts"] == {"kept": 9, "skipped": 1, "skip_reasons": {"wrong_answer": 1}}
    assert json.loads((tmp_path / "index.json").read_text()) == index == read_index(tmp_path)
    assert [r.sample_id for r in read_labels(tmp_path / "index.json")] == index["sample_ids"]
    with LabelWriter(tmp_path, rank=1, header=HEADER) as writer:
        writer.add(record("late"))
    with pytest.warns(UserWarning, match="1 shard.*not in index.json"):
        assert "late" not in {r.sample_id for r in read_labels(tmp_path)}


def test_merge_refuses_a_sample_stored_by_two_ranks(tmp_path: Path) -> None:
    with LabelWriter(tmp_path, rank=0, header=HEADER) as writer:
        writer.add(record("x/1"))
    with LabelWriter(tmp_path, rank=1, header=HEADER) as writer:
        writer.skip("x/1", "wrong_answer")
    with pytest.raises(ValueError, match=r"'x/1' is stored twice.*r000.*r001"):
        merge_index(tmp_path)
    assert not (tmp_path / "index.json").exists()


def test_merge_refuses_mixed_headers(tmp_path: Path) -> None:
    with LabelWriter(tmp_path, rank=0, header=HEADER) as writer:
        writer.add(record("a"))
    with LabelWriter(tmp_path, rank=1, header={**HEADER, "feature": "other"}) as writer:
        writer.add(record("b"))
    with pytest.raises(ValueError, match=r"disagree on the header \(feature\)"):
        merge_index(tmp_path)


@pytest.mark.parametrize("bad", [
    {"relevance": torch.zeros(5)},
    {"relevance": torch.tensor([1.0, -1, 1, 1, 1])},
    {"feature": torch.rand(4)},
    {"feature": torch.tensor([1.0, float("nan"), 1, 1, 1])},
    {"grid": torch.tensor([1, 1, 5])},
    {"meta": {"x": object()}},
])
def test_invalid_records_are_refused(bad: dict) -> None:
    kwargs = {"feature": torch.rand(5), "relevance": torch.rand(5) + 0.1, "grid": torch.tensor([[1, 1, 5]]),
              "meta": {}, **bad}
    with pytest.raises((ValueError, TypeError)):
        LabelRecord("s", **kwargs)
