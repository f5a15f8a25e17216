"""The benchmark harness on tiny models: every cell in JSON and markdown, sane ratios, resume, the analytic FLOPs
against torch's FlopCounterMode, the dataset adapter, the toy-world accuracy path."""

from __future__ import annotations

import importlib
import importlib.util
import json

import pytest
import torch
from conftest import make_inputs
from torch.utils.flop_counter import FlopCounterMode

from hf_tokenprune import prune_wrap, tiny, unwrap
from hf_tokenprune.bench import BenchSettings, dataset_accuracy, run
from hf_tokenprune.bench import runner as bench_runner
from hf_tokenprune.bench.accuracy import is_correct
from hf_tokenprune.bench.memory import TensorMemory
from hf_tokenprune.bench.models import tiny_model
from hf_tokenprune.bench.runner import COST_METHODS, RATIO_KEYS
from hf_tokenprune.stats import prefill_flops

INPUT_STAGE = ("compressor", "attention", "random", "divprune", "cdpruner", "compressor+dpp", "tome")
SETTINGS = dict(models=("tiny",), ratios=(0.5, 0.25), repeats=1, decode_tokens=2)


@pytest.fixture(scope="module")
def cost_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    records = run(out, BenchSettings(**SETTINGS), parts=("cost",), progress=False)
    return out, records


def test_cost_harness_writes_every_cell(cost_run):
    out, records = cost_run
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(records))
    cells = {(r["method"], r["ratio"]) for r in saved}
    assert cells == {("full", 1.0)} | {(m, r) for m in COST_METHODS for r in (0.5, 0.25)}
    for r in saved:
        assert {"model", "accuracy", "scoring_overhead", "peak_mem_bytes", *RATIO_KEYS} <= set(r)
        assert r["part"] == "cost" and r["model"] == "tiny" and r["peak_mem_bytes"] > 0
    markdown = (out / "results.md").read_text()
    for method in COST_METHODS:
        assert f"| {method} | 25% |" in markdown and f"| {method} | 50% |" in markdown


def test_cost_ratios_are_sane(cost_run):
    _, records = cost_run
    by_cell = {(r["method"], r["ratio"]): r for r in records}
    for (method, ratio), r in by_cell.items():
        if method == "full":
            assert all(r[k] == 1.0 for k in RATIO_KEYS)
            continue
        details = r["cost"]
        assert 0 < r["prefill_flops_ratio"] < 1 and 0 < r["kv_bytes_ratio"] < 1
        assert r["kv_bytes_ratio"] == pytest.approx(details["kv_bytes_ratio_analytic"])  # measured == analytic
        assert r["prefill_time_ratio"] > 0 and r["ttft_ratio"] > 0 and r["decode_speed_ratio"] > 0
        assert r["scoring_overhead"] >= 0 and r["peak_mem_ratio"] > 0
        if method in INPUT_STAGE and ratio == 0.25:
            assert r["prefill_flops_ratio"] < 0.5
            assert details["visual_tokens"][1] == pytest.approx(details["visual_tokens"][0] / 4, abs=1)
    # FastV runs its first K layers on every token: more FLOPs than input-stage pruning at the same retention
    assert by_cell[("fastv", 0.25)]["prefill_flops_ratio"] > by_cell[("attention", 0.25)]["prefill_flops_ratio"]


def test_rerun_skips_done_cells(cost_run, monkeypatch, tmp_path):
    out, records = cost_run
    target = tmp_path / "resume"
    target.mkdir()
    kept = [r for r in records if (r["method"], r["ratio"]) != ("fastv", 0.25)]
    (target / "results.json").write_text(json.dumps(kept))
    measured = []
    real = bench_runner.pruned_cost

    def counting(bench, method, ratio, *args, **kwargs):
        measured.append((method, ratio))
        return real(bench, method, ratio, *args, **kwargs)

    monkeypatch.setattr(bench_runner, "pruned_cost", counting)
    again = run(target, BenchSettings(**SETTINGS), parts=("cost",), progress=False)
    assert measured == [("fastv", 0.25)]
    assert len(again) == len(records)


def _language_model_flops(model, inputs) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    counts = counter.get_flop_counts()
    return sum(next(v for k, v in counts.items() if k.endswith("language_model")).values())


@pytest.mark.parametrize("scorer", ["full", "random", "fastv"])
def test_prefill_flops_formula_matches_flop_counter(scorer):
    """Eager attention (torch counts no FLOPs for CPU sdpa) computes the full square of scores and weighted sums,
    the formula the causal half: counted = formula + 2 n^2 heads head_dim per layer."""
    model = tiny.build_model("llava_onevision", num_hidden_layers=4, attn_implementation="eager")
    inputs = tiny_model().inputs
    text = model.config.get_text_config()
    length = inputs["input_ids"].shape[1]
    lengths = [length] * text.num_hidden_layers
    if scorer != "full":
        prune_wrap(model, ratio=0.25, scorer=scorer)
    counted = _language_model_flops(model, inputs)
    if scorer != "full":
        stats = model.tokenprune.last_stats
        lengths = [length] * stats.stages[0].layer + [stats.seq_len_after] * (len(lengths) - stats.stages[0].layer)
        assert stats.prefill_flops_after == prefill_flops(text, 1, lengths)
        unwrap(model)
    head_dim = text.hidden_size // text.num_attention_heads
    square = sum(2 * n * n * text.num_attention_heads * head_dim for n in lengths)
    # fastv's ranking (one query row and the keys at layer K) runs inside the text model and is counted too
    assert counted == pytest.approx(prefill_flops(text, 1, lengths) + square, rel=0.03 if scorer == "fastv" else 1e-6)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe"])
def test_prefill_flops_formula_matches_flop_counter_on_moe_layers(family):
    """Qwen3-VL-MoE's sparse layers (router + routed experts) and GLM-4.5V's (a dense first layer, routed and
    ungated shared experts), against the counter on eager experts (torch counts no FLOPs for grouped kernels)."""
    spec = tiny.get_family(family)
    config = spec.config(spec.model_class.config_class, 3, None)
    model = spec.model_class._from_config(config, attn_implementation="eager", experts_implementation="eager").eval()
    inputs = make_inputs(tiny.build_processor(family), "image", batch=1)
    text, length = model.config.get_text_config(), inputs["input_ids"].shape[1]
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    square = text.num_hidden_layers * 2 * length * length * heads * head_dim
    assert _language_model_flops(model, inputs) == prefill_flops(text, 1, length) + square


def test_tensor_memory_counts_live_storages():
    x = torch.randn(256, 256)
    with TensorMemory() as memory:
        a = x @ x
        b = a.view(-1)  # same storage: not counted twice
        del a
        c = torch.zeros(512, 256)
    assert memory.peak == b.numel() * 4 + c.numel() * 4
    del b, c
    assert memory.current == 0


def test_dataset_adapter_on_an_in_memory_dataset():
    datasets = pytest.importorskip("datasets")
    model, processor = tiny.build("llava")
    images = [tiny.make_image(i, size=56) for i in range(4)]
    questions = ["what colour is the circle", "what shape is it", "is there a star", "what colour is the square"]
    blank = [{"image": im, "question": q, "answer": "x"} for im, q in zip(images, questions, strict=True)]
    predictions = dataset_accuracy(model, processor, blank, batch_size=3, max_new_tokens=3)["predictions"]
    data = datasets.Dataset.from_dict({"picture": images, "prompt": questions,
                                       "label": [p or "none" for p in predictions]})
    columns = dict(image_column="picture", question_column="prompt", answer_column="label", batch_size=3,
                   max_new_tokens=3)
    full = dataset_accuracy(model, processor, data, **columns)
    assert full["n"] == 4 and full["predictions"] == predictions
    assert full["accuracy"] == sum(bool(p) for p in predictions) / 4
    prune_wrap(model, ratio=0.25, scorer="attention")
    pruned = dataset_accuracy(model, processor, data, limit=2, **columns)
    assert pruned["n"] == 2 and 0.0 <= pruned["accuracy"] <= 1.0


def test_answer_matching():
    assert is_correct("Red.", "red") and is_correct("the red one", ["blue", "red"])
    assert not is_correct("reddish", "red") and not is_correct("", "red")


def test_world_accuracy_skips_unshipped_models_and_measures_shipped_ones(tmp_path, monkeypatch, capsys):
    """Stand-ins for the world model (none / an untrained one) keep the test fast and independent of the assets;
    the compressor is skipped without one and measured with the shipped one."""
    from hf_tokenprune import world
    from hf_tokenprune.world import models

    settings = BenchSettings(families=("qwen2_vl",), accuracy_methods=("compressor", "random", "fastv"),
                             ratios=(0.25,), samples=4)
    monkeypatch.setattr(world, "load", lambda family: (_ for _ in ()).throw(FileNotFoundError("not shipped")))
    assert run(tmp_path / "none", settings, parts=("accuracy",), progress=False) == []
    assert "skipping toy-world accuracy for qwen2_vl" in capsys.readouterr().out

    untrained = (models.build_model("qwen2_vl"), models.build_processor("qwen2_vl"))
    monkeypatch.setattr(world, "load", lambda family: untrained)
    shipped = world.compressor_path
    monkeypatch.setattr(world, "compressor_path", lambda family: (_ for _ in ()).throw(FileNotFoundError(family)))
    records = run(tmp_path / "world", settings, parts=("accuracy",), progress=False)
    assert "no trained compressor, skipping method 'compressor'" in capsys.readouterr().out
    assert {(r["method"], r["ratio"]) for r in records} == {("full", 1.0), ("random", 0.25), ("fastv", 0.25)}
    assert all(r["model"] == "world-qwen2_vl" and 0 <= r["accuracy"] <= 1 and r["n"] == 4 for r in records)
    assert "| random | | " in (tmp_path / "world" / "results.md").read_text()

    try:
        shipped("qwen2_vl")
    except FileNotFoundError:
        return
    monkeypatch.setattr(world, "compressor_path", shipped)
    records = run(tmp_path / "world", settings, parts=("accuracy",), progress=False)  # resumes: compressor only
    assert {(r["method"], r["ratio"]) for r in records} == {("full", 1.0), ("compressor", 0.25), ("random", 0.25),
                                                             ("fastv", 0.25)}


def test_lmms_wrapper_says_what_to_install():
    if importlib.util.find_spec("lmms_eval") is not None:
        pytest.skip("lmms-eval is installed")
    with pytest.raises(ImportError, match="pip install lmms-eval"):
        importlib.import_module("hf_tokenprune.bench.lmms_wrapper")


def test_cli_bench_quick(tmp_path, capsys):
    from hf_tokenprune.cli import main

    args = ["bench", "--quick", "--part", "cost", "--models", "tiny", "--methods", "random", "fastv", "--repeats", "1",
            "--decode-tokens", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    records = json.loads((tmp_path / "results.json").read_text())
    assert {(r["method"], r["ratio"]) for r in records} == {("full", 1.0), ("random", 0.25), ("fastv", 0.25)}
    assert "wrote" in capsys.readouterr().out and (tmp_path / "results.md").exists()
