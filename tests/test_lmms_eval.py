"""The lmms-eval route end to end, offline: lmms-eval's own entry points (``simple_evaluate`` and its command line)
run the ``hf_tokenprune`` model on the local world task of :mod:`hf_tokenprune.bench.lmms_task`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason='lmms-eval is not installed; to keep your torch: pip install -e ".[lmms]" '
                                        "&& pip install --no-deps lmms-eval==0.7.3")

from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from hf_tokenprune import tiny  # noqa: E402
from hf_tokenprune.bench.lmms_task import TASK, write_task  # noqa: E402
from hf_tokenprune.bench.lmms_wrapper import TokenPruneLMM  # noqa: E402
from hf_tokenprune.world.evaluate import first_word  # noqa: E402

METRIC = "first_word_match,none"


@pytest.fixture
def offline(tmp_path, monkeypatch) -> dict[str, str]:
    """No Hub access; the datasets cache inside ``tmp_path``. Returns the environment for a subprocess."""
    for name, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                        "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache")}.items():
        monkeypatch.setenv(name, value)
    return dict(os.environ)


@pytest.fixture
def tiny_llava(tmp_path) -> Path:
    model, processor = tiny.build("llava")
    model.save_pretrained(tmp_path / "tiny-llava")
    processor.save_pretrained(tmp_path / "tiny-llava")
    return tmp_path / "tiny-llava"


def evaluate(model_args: str, task_dir: Path) -> tuple[TokenPruneLMM, dict]:
    """The registered ``hf_tokenprune`` model built from ``model_args`` as the command line builds it, and
    lmms-eval's results of it on the task in ``task_dir``."""
    lm = get_model("hf_tokenprune").create_from_arg_string(model_args, {"batch_size": 1, "device": "cpu"})
    results = simple_evaluate(model=lm, tasks=[TASK], log_samples=True,
                              task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    return lm, results


def check_scores(results: dict, n: int) -> float:
    """Every doc scored once; the metric is the mean first-word match of the logged answers. Returns it."""
    assert results["n-samples"][TASK] == {"original": n, "effective": n}
    samples = results["samples"][TASK]
    assert sorted(s["doc_id"] for s in samples) == list(range(n))
    score = results["results"][TASK][METRIC]
    assert isinstance(score, float) and 0.0 <= score <= 1.0
    hits = [float(first_word(s["filtered_resps"][0]) == s["target"]) for s in samples]
    assert [s["first_word_match"] for s in samples] == hits
    assert score == pytest.approx(sum(hits) / n)
    return score


def test_simple_evaluate_prunes_the_tiny_llava(tmp_path, offline, tiny_llava):
    n = 12
    task_dir = write_task(tmp_path / "task", n).parent
    lm, results = evaluate(f"pretrained={tiny_llava},ratio=0.25,scorer=attention", task_dir)
    assert type(lm) is TokenPruneLMM
    check_scores(results, n)
    assert len(lm.stats) == n and all(s is not None and s.scorer == "attention" for s in lm.stats)
    for stats in lm.stats:
        (before,), (after,) = stats.visual_tokens_before, stats.visual_tokens_after
        assert before > 0 and after == pytest.approx(0.25 * before, abs=1)


def test_command_line_runs_the_registered_model(tmp_path, offline, tiny_llava):
    n = 6
    task_dir = write_task(tmp_path / "task", n).parent
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "hf_tokenprune.bench.lmms_wrapper", "--model", "hf_tokenprune",
                          "--model_args", f"pretrained={tiny_llava},ratio=0.25,scorer=random", "--tasks", TASK,
                          "--include_path", str(task_dir), "--device", "cpu", "--output_path", str(out),
                          "--log_samples"], env=offline, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"hf_tokenprune: {n} of {n} requests pruned" in run.stdout + run.stderr
    (saved,) = out.rglob("*_results.json")
    results = json.loads(saved.read_text())
    assert results["n-samples"][TASK] == {"original": n, "effective": n}
    assert 0.0 <= results["results"][TASK][METRIC] <= 1.0
    (samples,) = out.rglob(f"*_samples_{TASK}.jsonl")
    assert len(samples.read_text().splitlines()) == n


def test_real_weights_testbed_answers_and_prunes(tmp_path, offline):
    """The real-weights LLaVA with its trained projector: right on most questions unpruned, pruned at 25%."""
    from hf_tokenprune.bench.realweights import MissingPackageError
    from hf_tokenprune.testbed import model as testbed

    if not (testbed.ASSETS / testbed.PROJECTOR).exists():
        pytest.skip(f"the testbed's trained projector is not shipped yet ({testbed.ASSETS / testbed.PROJECTOR})")
    directory = tmp_path / "testbed"
    try:
        testbed.main(["--out", str(directory)])
    except MissingPackageError as error:
        pytest.skip(str(error))
    n = 24
    task_dir = write_task(tmp_path / "task", n).parent
    full, results = evaluate(f"pretrained={directory},ratio=1.0", task_dir)
    assert check_scores(results, n) > 0.5 and full.stats == [None] * n
    pruned, results = evaluate(f"pretrained={directory},ratio=0.25,scorer=attention", task_dir)
    check_scores(results, n)
    assert all(sum(s.visual_tokens_after) < sum(s.visual_tokens_before) for s in pruned.stats)
