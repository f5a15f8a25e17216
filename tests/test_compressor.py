import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from hf_tokenprune.compressor import (
    Compressor,
    CompressorMismatchError,
    CompressorNotFoundError,
    DepthwiseSeparableConv1d,
    InvalidCompressorError,
)

DEFAULT_CHANNELS = (32, 64, 128, 256, 512)
SMALL = {"channels": (8, 16, 24), "kernel_size": 3}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def attention_like(*lengths: int) -> list[torch.Tensor]:
    """Positive, skewed per-token attention values of order 1/L."""
    return [torch.softmax(3 * torch.randn(n), dim=0) * 0.3 for n in lengths]


def pad(rows: list[torch.Tensor], fill: float = float("nan")) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    features = torch.full((len(rows), n), fill)
    mask = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, r in enumerate(rows):
        features[i, : len(r)] = r
        mask[i, : len(r)] = True
    return features, mask


def test_default_architecture_and_output_contract() -> None:
    model = Compressor()
    assert len(model.blocks) == 5
    c_in = DEFAULT_CHANNELS[0]
    assert model.lift.in_channels == 1 and model.lift.out_channels == c_in
    for block, c_out in zip(model.blocks, DEFAULT_CHANNELS, strict=True):
        assert isinstance(block, DepthwiseSeparableConv1d)
        dw, pw = block.depthwise, block.pointwise
        assert (dw.in_channels, dw.out_channels, dw.groups) == (c_in, c_in, c_in)
        assert dw.kernel_size == (5,) and dw.padding == "same"
        assert (pw.in_channels, pw.out_channels, pw.kernel_size) == (c_in, c_out, (1,))
        assert block.norm.normalized_shape == (c_out,)
        c_in = c_out
    assert (model.head.in_channels, model.head.out_channels) == (512, 1)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())

    features, mask = pad(attention_like(10, 6))
    logits = model(features, mask)
    assert logits.shape == (2, 10)
    assert torch.isinf(logits[1, 6:]).all() and (logits[1, 6:] < 0).all()
    assert torch.isfinite(logits[mask]).all()
    rel = model.relevance(features, mask)
    assert rel.shape == (2, 10)
    assert (rel[1, 6:] == 0).all() and (rel[mask] > 0).all()
    torch.testing.assert_close(rel.sum(dim=1), torch.ones(2))


def test_mask_none_means_all_valid_and_all_padding_row_is_zero() -> None:
    model = Compressor(**SMALL)
    features = attention_like(12)[0][None]
    torch.testing.assert_close(model(features), model(features, torch.ones(1, 12, dtype=torch.bool)))
    rel = model.relevance(torch.rand(2, 5), torch.tensor([[True] * 5, [False] * 5]))
    assert not rel.isnan().any() and (rel[1] == 0).all()
    torch.testing.assert_close(rel[0].sum(), torch.tensor(1.0))
    (rel * torch.arange(5.0)).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_invalid_inputs_are_refused() -> None:
    model = Compressor(**SMALL)
    with pytest.raises(ValueError, match="features"):
        model(torch.rand(1, 2, 3))
    with pytest.raises(ValueError, match="mask shape"):
        model(torch.rand(2, 5), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="right-padded"):
        model(torch.rand(1, 4), torch.tensor([[False, True, True, True]]))


def test_padding_invariance() -> None:
    model = Compressor().eval()
    rows = attention_like(37, 100)
    features, mask = pad(rows)  # NaN in the padded slots: they must never be read
    with torch.no_grad():
        batched_logits = model(features, mask)
        batched_rel = model.relevance(features, mask)
        for i, row in enumerate(rows):
            n = len(row)
            alone_logits, alone_rel = model(row[None])[0], model.relevance(row[None])[0]
            torch.testing.assert_close(batched_logits[i, :n], alone_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched_rel[i, :n], alone_rel, atol=1e-5, rtol=1e-5)


def test_invariant_to_feature_scale() -> None:
    model = Compressor(**SMALL)
    features = torch.stack(attention_like(20, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(features), model(features * 37.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 5000])
def test_extreme_lengths(n: int) -> None:
    model = Compressor()
    with torch.no_grad():
        rel = model.relevance(attention_like(n)[0][None])
    assert rel.shape == (1, n) and torch.isfinite(rel).all()
    torch.testing.assert_close(rel.sum(), torch.tensor(1.0))


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = Compressor(**SMALL, base_model_type="llava", base_model_name="llava-hf/llava-1.5-7b-hf")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {"channels": [8, 16, 24], "kernel_size": 3, "base_model_type": "llava",
                      "base_model_name": "llava-hf/llava-1.5-7b-hf", "feature": "first_layer_attention"}

    loaded = Compressor.from_pretrained(tmp_path)
    assert loaded.channels == (8, 16, 24) and loaded.kernel_size == 3
    assert loaded.base_model_type == "llava" and loaded.base_model_name == "llava-hf/llava-1.5-7b-hf"
    assert loaded.feature == "first_layer_attention"
    features, mask = pad(attention_like(9, 30))
    with torch.no_grad():
        torch.testing.assert_close(loaded(features, mask), model(features, mask), atol=0, rtol=0)


def _fill_hub_cache(cache: Path, source: Path, files: list[str]) -> None:
    """Lay out ``models--org--name`` the way huggingface_hub's cache does (plain files, no blobs)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--org--name"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in files:
        shutil.copy(source / name, snapshot / name)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE at import, so patch the constant as well as the env var.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("via", ["env", "cache_dir"])
def test_load_offline_from_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: None,
                                     via: str) -> None:
    model = Compressor(**SMALL, base_model_type="qwen2_vl")
    model.save_pretrained(tmp_path / "saved")
    cache = tmp_path / "hub"
    _fill_hub_cache(cache, tmp_path / "saved", ["config.json", "model.safetensors"])
    kwargs = {}
    if via == "env":
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    else:
        kwargs["cache_dir"] = cache
    loaded = Compressor.from_pretrained("org/name", **kwargs)
    assert loaded.base_model_type == "qwen2_vl" and loaded.channels == SMALL["channels"]
    features = torch.stack(attention_like(16, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(features), model(features), atol=0, rtol=0)


@pytest.fixture
def no_torch_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", refuse)


def _pickle_only_dir(path: Path) -> Path:
    model = Compressor(**SMALL)
    model.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    return path


def test_pickle_only_directory_is_refused(tmp_path: Path, no_torch_load: None) -> None:
    directory = _pickle_only_dir(tmp_path / "pickled")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*pytorch_model\.bin.*pickle"):
        Compressor.from_pretrained(directory)


def test_pickle_only_hub_cache_is_refused_offline(tmp_path: Path, offline: None, no_torch_load: None) -> None:
    # The plain mixin falls back to pytorch_model.bin here (LocalEntryNotFoundError is an EntryNotFoundError).
    _pickle_only_dir(tmp_path / "pickled")
    _fill_hub_cache(tmp_path / "hub", tmp_path / "pickled", ["config.json", "pytorch_model.bin"])
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*local Hub cache"):
        Compressor.from_pretrained("org/name", cache_dir=tmp_path / "hub")


def test_missing_config_and_mismatched_weights_are_refused(tmp_path: Path) -> None:
    Compressor(**SMALL).save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.json").unlink()
    with pytest.raises(CompressorNotFoundError, match=re.escape(f"({tmp_path / 'a'}) has no config.json")):
        Compressor.from_pretrained(tmp_path / "a")

    Compressor(channels=(8, 16), kernel_size=3).save_pretrained(tmp_path / "b")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    (tmp_path / "b" / "config.json").write_text(json.dumps({**config, "channels": [8, 16, 16]}))
    with pytest.raises(InvalidCompressorError, match=r"missing tensors \[.*blocks\.2"):  # checked before loading
        Compressor.from_pretrained(tmp_path / "b")


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any request to the Hub (ours or the mixin's) fails the test."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the Hub was asked: {args} {kwargs}")

    for target in ("hf_tokenprune.compressor.get_hf_file_metadata", "hf_tokenprune.compressor.hf_hub_download",
                   "huggingface_hub.hub_mixin.hf_hub_download"):
        monkeypatch.setattr(target, refuse, raising=False)


@pytest.mark.parametrize(("name", "resolved"), [
    ("./my-compresor", "my-compresor"),
    ("../missing-compressor", "../missing-compressor"),
    ("missing/dir/deeper", "missing/dir/deeper"),
    ("~/no-compressor", "home/no-compressor"),
    ("sub/missing", "sub/missing"),  # sub/ exists here: a path, not a Hub repo id
    ("weights.bin", "weights.bin"),  # exists, but is not a directory
    (Path("missing"), "missing"),
])
def test_a_path_that_is_not_a_compressor_directory_says_so_without_asking_the_hub(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_hub: None, name: str | Path, resolved: str) -> None:
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "weights.bin").write_bytes(b"")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work / "home"))
    problem = "is not a directory" if resolved == "weights.bin" else "does not exist"
    with pytest.raises(CompressorNotFoundError) as info:
        Compressor.from_pretrained(name)
    message = str(info.value)
    assert message.startswith(f"compressor directory {str(name)!r} {problem}")
    assert str((work / resolved).resolve()) in message


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"channels": [10**9]}, "channels"),
        ({"channels": []}, "channels"),
        ({"channels": [8] * 17}, "channels"),
        ({"channels": "abc"}, "channels"),
        ({"channels": [8, 16.0]}, "channels"),
        ({"channels": [True]}, "channels"),
        ({"kernel_size": 4}, "kernel_size"),
        ({"kernel_size": 65}, "kernel_size"),
        ({"kernel_size": "5"}, "kernel_size"),
        ({"feature": "x"}, "feature"),
        ({"feature": "first_layer_attention", "in_channels": 9}, "in_channels"),
        ({"feature": "layer_attention", "in_channels": 1}, "in_channels"),
        ({"feature": "first_layer_head_attention", "in_channels": 0}, "in_channels"),
        ({"base_model_type": 3}, "base_model_type"),
        ({"base_model_name": ["a"]}, "base_model_name"),
    ],
)
def test_invalid_config_raises_naming_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Compressor(**kwargs)


def test_malicious_config_is_refused_before_allocation(tmp_path: Path) -> None:
    Compressor(**SMALL).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "channels": [10**9]}))
    with pytest.raises(ValueError, match="channels"):
        Compressor.from_pretrained(tmp_path)


def test_check_compatible() -> None:
    model = Compressor(**SMALL, base_model_type="llava", base_model_name="llava-hf/llava-1.5-7b-hf")
    with pytest.raises(CompressorMismatchError, match=r"'llava'.*'qwen2_vl'.*allow_mismatch=True") as info:
        model.check_compatible("qwen2_vl")
    assert isinstance(info.value, ValueError)
    model.check_compatible("qwen2_vl", allow_mismatch=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.check_compatible("llava", "llava-hf/llava-1.5-7b-hf")
        model.check_compatible("llava", "/models/llava-1.5-7b-hf/")  # a local copy of the same model
        model.check_compatible("llava")
        Compressor(**SMALL).check_compatible("anything", "any/name")
    with pytest.warns(UserWarning, match="llava-1.5-13b"):
        model.check_compatible("llava", "llava-hf/llava-1.5-13b-hf")


def test_gradients_reach_every_weight() -> None:
    model = Compressor()
    features, mask = pad(attention_like(40, 25))
    target = torch.softmax(torch.randn(2, 40), dim=1).masked_fill(~mask, 0)
    target = target / target.sum(dim=1, keepdim=True)
    log_q = torch.log_softmax(model(features, mask), dim=1)
    kl = torch.where(mask, target * (torch.log(target.clamp_min(1e-30)) - log_q), 0.0).sum() / 2
    kl.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        if name.endswith("weight") and param.dim() == 3:  # conv weights
            assert param.grad.abs().sum() > 0, name
