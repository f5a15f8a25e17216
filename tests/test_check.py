"""``hf-tokenprune check``: versions, a pass/fail summary, the exit code, and ``ratio=1.0``."""

import json
from pathlib import Path

import pytest
import torch
import transformers

from hf_tokenprune import check, cli, tiny

VERSIONS = f"(transformers {transformers.__version__}, torch {torch.__version__})"


def test_check_at_ratio_one_compares_exactly_with_the_unpruned_model(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["check", "--ratio", "1.0", "--max-new-tokens", "2", "--json", str(tmp_path / "c.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"hf-tokenprune check: transformers {transformers.__version__}, torch "
                               f"{torch.__version__}")
    rows = json.loads((tmp_path / "c.json").read_text())
    cases = sum(len(tiny.MODALITIES[f]) for f in tiny.FAMILIES)
    assert len(rows) == cases and lines[-1] == f"check: {cases} passed, 0 failed {VERSIONS}"
    for row in rows:
        assert row["passed"] and row["max_logit_diff"] == 0.0 and row["kept"] == row["visual_tokens"]
        assert row["kv_cache_ratio"] == 1.0 and all(n > 0 for n in row["visual_tokens"])


def test_check_reports_failures_and_exits_non_zero(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(tiny, "FAMILIES", ("llava",))
    assert cli.main(["check", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"check: 1 passed, 0 failed {VERSIONS}"
    monkeypatch.setattr(check, "LOGIT_TOLERANCE", -1.0)  # no logit difference passes
    assert cli.main(["check", "--max-new-tokens", "2"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == f"check: 0 passed, 1 failed {VERSIONS}"


def test_check_compares_qwen3_5_with_the_pruned_sequence_reference(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """A hybrid (linear-attention) family is checked against the unwrapped model run on the pruned sequence."""
    monkeypatch.setattr(tiny, "FAMILIES", ("qwen3_5",))
    rows = check.run(max_new_tokens=2)
    assert [(r["input"], r["reference"], r["passed"]) for r in rows] == [
        ("image", "pruned sequence", True), ("video", "pruned sequence", True)]
    assert all(k < n for r in rows for k, n in zip(r["kept"], r["visual_tokens"], strict=True))
