"""The command line's errors: one line on stderr and a non-zero exit code; ``--debug`` adds the traceback."""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import free_port
from huggingface_hub import constants
from test_training import TINY, synthetic

from hf_tokenprune import cli
from hf_tokenprune.compressor import Compressor
from hf_tokenprune.training import LabelWriter, merge_index, train_compressor


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    """The error line, the last of stderr (loading a model may draw progress bars before it), and no traceback."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[-1].startswith("hf-tokenprune: error: ") and "Traceback" not in err, err
    return lines[-1]


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub at a local port nobody listens on: connections are refused, as without network."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)


def test_push_without_network_is_one_line(tmp_path: Path, unreachable_hub: None,
                                          capsys: pytest.CaptureFixture) -> None:
    Compressor(channels=(4, 8), kernel_size=3).save_pretrained(tmp_path / "c")
    assert cli.main(["push", str(tmp_path / "c"), "--repo", "me/x"]) == 1
    assert "could not reach the Hugging Face Hub" in one_error_line(capsys)

    assert cli.main(["--debug", "push", str(tmp_path / "c"), "--repo", "me/x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)")
    assert err.splitlines()[-1].startswith("hf-tokenprune: error: could not reach the Hugging Face Hub")


def test_a_bad_channel_list_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--labels", str(tmp_path), "--out", str(tmp_path / "c"), "--channels", "16,abc"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --channels: expected comma-separated integers, e.g. 32,64,128; got '16,abc'" in err
    assert "Traceback" not in err


def test_training_into_a_checkpoint_names_the_resume_flag(labels: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    train_compressor(labels, tmp_path / "c", epochs=1, **TINY)
    argv = ["train", "--labels", str(labels), "--out", str(tmp_path / "c"), "--epochs", "1"]
    assert cli.main(argv) == 1
    line = one_error_line(capsys)
    assert "already holds a training checkpoint" in line and "--resume" in line

    assert cli.main([*argv, "--debug"]) == 1  # --debug after the command works too
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "FileExistsError" in err


@pytest.fixture
def labels(tmp_path: Path) -> Path:
    with LabelWriter(tmp_path / "labels") as writer:
        for record in synthetic(16):
            writer.add(record)
    merge_index(tmp_path / "labels")
    return tmp_path / "labels"


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """Restore torch's thread count after the test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("option", "omp", "expected"), [
    (["--threads", "3"], "2", 3),  # given
    ([], None, 4),  # half the 8 usable CPUs
    ([], "2", 5),  # OMP_NUM_THREADS set: torch's own setting (5 here) is left alone
])
def test_threads_of_the_cpu_commands(labels: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     torch_threads: None, option: list[str], omp: str | None, expected: int) -> None:
    torch.set_num_threads(5)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    argv = ["train", "--labels", str(labels), "--out", str(tmp_path / "c"), "--epochs", "1", "--quiet", *option]
    assert cli.main(argv) == 0
    assert torch.get_num_threads() == expected


def test_threads_must_be_positive(labels: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--labels", str(labels), "--out", str(tmp_path / "c"), "--threads", "0"])
    assert info.value.code == 2 and "argument --threads: expected an integer >= 1, got '0'" in capsys.readouterr().err


def test_a_compressor_of_another_family_is_one_line(built, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from hf_tokenprune import tiny

    model, processor = built("qwen2_vl")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    Compressor(channels=(4, 8), kernel_size=3, base_model_type="llava").save_pretrained(tmp_path / "c")
    tiny.make_image(0, size=(56, 56)).save(tmp_path / "0.png")
    (tmp_path / "data.jsonl").write_text('{"question": "what colour?", "answer": "red", "image": "0.png"}\n')
    assert cli.main(["calibrate", "--model", str(tmp_path / "model"), "--compressor", str(tmp_path / "c"),
                     "--data", str(tmp_path / "data.jsonl"), "--limit", "1"]) == 1
    assert "trained for model_type 'llava' but the model has model_type 'qwen2_vl'" in one_error_line(capsys)


def test_train_names_the_base_model_it_is_for(labels: Path, tmp_path: Path) -> None:
    argv = ["train", "--labels", str(labels), "--out", str(tmp_path / "c"), "--epochs", "1", "--quiet",
            "--base-model", "org/some-vlm"]
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "c" / "config.json").read_text())["base_model_name"] == "org/some-vlm"
    assert "org/some-vlm" in (tmp_path / "c" / "README.md").read_text()
