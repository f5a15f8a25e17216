"""The command line's errors: one line on stderr and a non-zero exit code; ``--debug`` adds the traceback."""

import socket
from pathlib import Path

import pytest
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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
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


def test_training_into_a_checkpoint_names_the_resume_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with LabelWriter(tmp_path / "labels") as writer:
        for record in synthetic(16):
            writer.add(record)
    merge_index(tmp_path / "labels")
    train_compressor(tmp_path / "labels", tmp_path / "c", epochs=1, **TINY)
    argv = ["train", "--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "c"), "--epochs", "1"]
    assert cli.main(argv) == 1
    line = one_error_line(capsys)
    assert "already holds a training checkpoint" in line and "--resume" in line

    assert cli.main([*argv, "--debug"]) == 1  # --debug after the command works too
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "FileExistsError" in err


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
