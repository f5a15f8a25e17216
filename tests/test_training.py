"""Compressor training on synthetic labels: it learns, beats the raw attention, is deterministic and resumable."""

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import free_port
from safetensors.torch import load_file

from hf_tokenprune import cli
from hf_tokenprune.compressor import Compressor, CompressorMismatchError
from hf_tokenprune.scorers import CompressorScorer
from hf_tokenprune.training import LabelRecord, LabelWriter, evaluate_compressors, merge_index, train_compressor
from hf_tokenprune.training.data import is_validation, relevance_target
from hf_tokenprune.training.metrics import kl_divergence, ranking_metrics
from hf_tokenprune.training.train import CHECKPOINT

TINY = {"channels": (8, 16), "kernel_size": 5, "batch_size": 16, "lr": 3e-3, "val_fraction": 0.25,
        "progress": False}


def synthetic(count: int, layers: int | None = None, seed: int = 0) -> list[LabelRecord]:
    """Attention ``A = softmax(2x)`` of random logits ``x``; the relevant tokens are those two positions after a
    well-attended neighbourhood: ``R = softmax(4 * shift_2(smooth_3(x)))``. A CNN with a receptive field of +-4
    learns it; ranking by ``A`` itself is no better than chance."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(count):
        n = int(torch.randint(24, 64, (1,), generator=g))
        x = torch.randn(n, generator=g)
        smooth = F.avg_pool1d(x[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]
        shifted = torch.cat([smooth.new_full((2,), smooth.min()), smooth[:-2]])
        feature = torch.softmax(2 * x, 0) * 0.3
        if layers is not None:
            feature = torch.stack([feature, *torch.rand(layers - 1, n, generator=g)])
        records.append(LabelRecord(f"s{i:04d}", feature, torch.softmax(4 * shifted, 0), torch.tensor([[1, 1, n]]),
                                   {"question": "synthetic"}))
    return records


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The networks here are tiny: intra-op threads only add overhead (and fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("compressor")
    records = synthetic(200)
    return records, train_compressor(records, out, epochs=10, seed=0, base_model_type="qwen2_vl", **TINY)


def test_target_keeps_the_top_half_renormalised() -> None:
    relevance = torch.tensor([0.1, 0.4, 0.0, 0.3, 0.2])
    torch.testing.assert_close(relevance_target(relevance), torch.tensor([0.0, 0.4, 0.0, 0.3, 0.2]) / 0.9)


def test_split_is_a_stable_function_of_the_id() -> None:
    ids = [f"id-{i}" for i in range(2000)]
    val = [s for s in ids if is_validation(s, 0.1)]
    assert 150 < len(val) < 250
    assert val == [s for s in reversed(ids) if is_validation(s, 0.1)][::-1]
    assert set(val) <= {s for s in ids if is_validation(s, 0.2)}


def test_metrics_on_known_rankings() -> None:
    relevance = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6, 7], [3.0, 2, 1, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[True] * 8, [True] * 3 + [False] * 5])
    perfect = ranking_metrics(relevance, relevance, mask)
    reverse = ranking_metrics(-relevance, relevance, mask)
    for name in ("recall@25", "recall@50", "pointing"):
        torch.testing.assert_close(perfect[name], torch.ones(2))
    torch.testing.assert_close(reverse["recall@50"], torch.tensor([0.0, 0.5]))  # row 1: top 2 of 3 overlap in 1
    target = relevance / relevance.sum(dim=1, keepdim=True)
    log_q = torch.log_softmax(torch.zeros(2, 8).masked_fill(~mask, -1e30), dim=1)
    assert kl_divergence(target, torch.log(target.clamp_min(1e-30)), mask).abs().max() < 1e-6
    assert (kl_divergence(target, log_q, mask) > 0).all()


def test_training_learns_what_the_raw_attention_misses(trained) -> None:
    _, result = trained
    kls = [h["kl"] for h in result.history]
    assert all(b < a for a, b in zip(kls[:5], kls[1:6], strict=True)), kls
    assert result.best_epoch == min(result.history, key=lambda h: h["kl"])["epoch"]
    assert result.metrics["kl"] < 0.3 * result.baseline["kl"]
    assert result.metrics["recall@25"] > result.baseline["recall@25"] + 0.4
    assert result.metrics["recall@50"] > result.baseline["recall@50"] + 0.2
    assert result.metrics["pointing"] > 0.8 > 0.2 > result.baseline["pointing"]


def test_saved_directory_is_a_compressor_with_a_card(trained) -> None:
    records, result = trained
    directory = result.directory
    assert {p.name for p in directory.iterdir()} == {"config.json", "model.safetensors", "README.md",
                                                     "training_log.json", "checkpoint"}
    loaded = Compressor.from_pretrained(directory)
    assert loaded.base_model_type == "qwen2_vl" and loaded.channels == (8, 16)
    assert result.best_epoch == len(result.history)  # so the last checkpoint holds the best weights
    trained_model = Compressor(channels=(8, 16), kernel_size=5)
    trained_model.load_state_dict({k[6:]: v for k, v in _weights(directory).items() if k.startswith("model/")})
    features = torch.stack([r.feature for r in records if r.feature.numel() == records[0].feature.numel()][:3])
    with torch.no_grad():
        torch.testing.assert_close(loaded.relevance(features), trained_model.relevance(features), rtol=0, atol=0)
    card = (directory / "README.md").read_text()
    assert "library_name: hf_tokenprune" in card and "prune_wrap(model, ratio=0.25, compressor=" in card
    assert f"{result.metrics['kl']:.4f}" in card and f"{result.baseline['recall@25']:.3f}" in card
    log = json.loads((directory / "training_log.json").read_text())
    assert log["history"] == result.history and log["baseline_attention"] == result.baseline


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(directory / CHECKPOINT).items() if not k.startswith("rng/")}


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_file_of_a_trained_compressor_gets_the_umask_permissions(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        train_compressor(synthetic(16), tmp_path / "c", epochs=1, **TINY)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "c").iterdir() if p.is_file()}
    assert modes == dict.fromkeys(["config.json", "model.safetensors", "README.md", "training_log.json"],
                                  0o666 & ~umask)


def test_same_seed_same_weights_and_resume_equals_uninterrupted(tmp_path: Path) -> None:
    records = synthetic(48)
    full = train_compressor(records, tmp_path / "full", epochs=4, seed=3, **TINY)
    again = train_compressor(records, tmp_path / "again", epochs=4, seed=3, **TINY)
    other = train_compressor(records, tmp_path / "other", epochs=1, seed=4, **TINY)
    train_compressor(records, tmp_path / "resumed", epochs=2, seed=3, **TINY)  # "interrupted" after epoch 2
    with pytest.raises(FileExistsError, match="resume=True"):
        train_compressor(records, tmp_path / "resumed", epochs=4, seed=3, **TINY)
    with pytest.raises(ValueError, match="cannot resume.*lr"):
        train_compressor(records, tmp_path / "resumed", epochs=4, seed=3, resume=True, **{**TINY, "lr": 1e-2})
    resumed = train_compressor(records, tmp_path / "resumed", epochs=4, seed=3, resume=True, **TINY)

    reference = _weights(tmp_path / "full")
    assert any(k.startswith("optimizer/") for k in reference)
    for run in ("again", "resumed"):
        weights = _weights(tmp_path / run)
        assert weights.keys() == reference.keys()
        assert all(torch.equal(weights[k], reference[k]) for k in reference), run
        best = (tmp_path / run / "model.safetensors").read_bytes()
        assert best == (tmp_path / "full" / "model.safetensors").read_bytes(), run
    assert resumed.history == full.history == again.history
    assert not torch.equal(_weights(tmp_path / "other")["model/head.weight"], reference["model/head.weight"])
    assert other.history[0] != full.history[0]


def test_multi_layer_feature_trains_a_multi_channel_compressor(tmp_path: Path) -> None:
    result = train_compressor(synthetic(40, layers=3), tmp_path, epochs=1, **TINY)
    compressor = Compressor.from_pretrained(result.directory)
    assert (compressor.feature, compressor.in_channels, compressor.lift.in_channels) == ("layer_attention", 3, 3)
    assert json.loads((tmp_path / "config.json").read_text())["in_channels"] == 3
    assert compressor.relevance(torch.rand(2, 3, 11)).shape == (2, 11)
    with pytest.raises(ValueError, match="layer_attention"):
        CompressorScorer(compressor)


def test_cli_train_from_a_label_directory(tmp_path: Path) -> None:
    header = {"model_type": "llava", "model_name": "llava-hf/llava-1.5-7b-hf", "feature": "first_layer_attention"}
    with LabelWriter(tmp_path / "labels", header=header, shard_size=16) as writer:
        for record in synthetic(40):
            writer.add(record)
        writer.skip("wrong", "wrong_answer")
    merge_index(tmp_path / "labels")
    argv = ["train", "--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "out"), "--epochs", "2",
            "--channels", "4,8", "--batch-size", "8", "--val-fraction", "0.25", "--seed", "1", "--quiet"]
    assert cli.main(argv) == 0
    compressor = Compressor.from_pretrained(tmp_path / "out")
    assert (compressor.base_model_type, compressor.base_model_name) == ("llava", "llava-hf/llava-1.5-7b-hf")
    assert compressor.channels == (4, 8)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: llava-hf/llava-1.5-7b-hf" in card and "wrong_answer: 1" in card
    assert cli.main([*argv[:5], "--epochs", "3", *argv[7:], "--resume"]) == 0
    assert len(json.loads((tmp_path / "out" / "training_log.json").read_text())["history"]) == 3


def test_evaluate_scores_compressors_on_the_held_out_labels(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``hf-tokenprune evaluate`` scores a saved compressor on the validation split its training held out: the
    metrics training reported for its best epoch, and raw attention's; another family's or feature's is refused."""
    with LabelWriter(tmp_path / "labels", header={"model_type": "llava"}) as writer:
        for record in synthetic(40):
            writer.add(record)
    merge_index(tmp_path / "labels")
    result = train_compressor(tmp_path / "labels", tmp_path / "a", epochs=3, **TINY)
    argv = ["evaluate", "--labels", str(tmp_path / "labels"), "--compressor", str(tmp_path / "a")]
    assert cli.main([*argv, "--val-fraction", str(TINY["val_fraction"])]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores[str(tmp_path / "a")] == pytest.approx(result.metrics)
    assert scores["attention"] == pytest.approx(result.baseline)
    assert cli.main([*argv, "--all"]) == 0  # every label: the training labels too, so other figures
    assert json.loads(capsys.readouterr().out)["attention"] != pytest.approx(result.baseline)
    Compressor(channels=(4,), base_model_type="qwen2_vl").save_pretrained(tmp_path / "qwen")
    with pytest.raises(CompressorMismatchError, match="qwen2_vl"):
        evaluate_compressors(tmp_path / "labels", [tmp_path / "qwen"])
    Compressor(channels=(4,), feature="layer_attention", in_channels=3).save_pretrained(tmp_path / "layers")
    with pytest.raises(ValueError, match=r"reads layer_attention \(3 channel\(s\)\), the labels hold "
                                         r"first_layer_attention \(1\)"):
        evaluate_compressors(tmp_path / "labels", [tmp_path / "layers"])
    Compressor(channels=(4,), feature="first_layer_head_attention", in_channels=1).save_pretrained(tmp_path / "head")
    with pytest.raises(ValueError, match=r"reads first_layer_head_attention \(1 channel"):  # same width, not A^0_v
        evaluate_compressors(tmp_path / "labels", [tmp_path / "head"])


def test_cli_ends_the_process_group(tmp_path: Path) -> None:
    """A launched ``train`` ends its gloo process group before the interpreter exits (left to the exit, a rank can
    abort: "terminate called without an active exception"). One rank, so the group is observable after ``main``."""
    with LabelWriter(tmp_path / "labels", header={"model_type": "qwen2_vl"}) as writer:
        for record in synthetic(8):
            writer.add(record)
    merge_index(tmp_path / "labels")
    script = ("import sys, torch.distributed as dist; from hf_tokenprune import cli; "
              "code = cli.main(sys.argv[1:]); print('initialized', dist.is_initialized()); sys.exit(code)")
    argv = [sys.executable, "-c", script, "train", "--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "out"),
            "--epochs", "1", "--channels", "4", "--batch-size", "8", "--val-fraction", "0.25", "--quiet"]
    port = free_port()
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "initialized False"


def test_two_processes_train_data_parallel(tmp_path: Path) -> None:
    """``torchrun`` (as ``accelerate launch`` does) with 2 CPU processes: ranks agree, only the main one writes."""
    with LabelWriter(tmp_path / "labels", header={"model_type": "qwen2_vl"}) as writer:
        for record in synthetic(40):
            writer.add(record)
    merge_index(tmp_path / "labels")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "hf_tokenprune.cli", "train", "--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "out"),
            "--epochs", "2", "--channels", "4,8", "--batch-size", "8", "--val-fraction", "0.25", "--quiet"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}  # CPU ranks even on a GPU machine
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count('"best_epoch"') == 1  # printed by the main process only
    log = json.loads((tmp_path / "out" / "training_log.json").read_text())
    single = train_compressor(tmp_path / "labels", tmp_path / "single", epochs=1, channels=(4, 8), batch_size=16,
                              val_fraction=0.25, progress=False)
    assert [h["epoch"] for h in log["history"]] == [1, 2]
    assert log["baseline_attention"] == single.baseline  # validation metrics gathered over both ranks
    assert Compressor.from_pretrained(tmp_path / "out").base_model_type == "qwen2_vl"
