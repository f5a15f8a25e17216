"""Hub integration without network: the naming convention, lookup from an offline cache, push against a fake API."""

import re
import shutil
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import free_port
from huggingface_hub import constants
from huggingface_hub.utils import filter_repo_objects

from hf_tokenprune import CompressorNotFoundError, cli, methods, prune_wrap
from hf_tokenprune.compressor import Compressor
from hf_tokenprune.config import AUTO_FALLBACK_SCORER, FALLBACK_SCORER
from hf_tokenprune.hub import default_compressor_repo, load_compressor, push_compressor
from hf_tokenprune.methods import NoCompressorWarning

SMALL = {"channels": (4, 8), "kernel_size": 3}
QWEN = "Qwen/Qwen2-VL-2B-Instruct"
QWEN_REPO = "hf-tokenprune/Qwen2-VL-2B-Instruct-compressor"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache, offline; huggingface_hub reads both settings at import, so patch the constants too."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setenv(name, "1" if value is True else value)
        monkeypatch.setattr(constants, name, value)
    return cache


def cache_compressor(cache: Path, repo_id: str, compressor: Compressor, tmp_path: Path) -> None:
    """Lay out ``models--{owner}--{name}/snapshots/{commit}`` + ``refs/main`` as a download would."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    compressor.save_pretrained(tmp_path / "saved")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tmp_path / "saved", repo / "snapshots" / commit)


@pytest.mark.parametrize(("name_or_path", "expected"), [
    (QWEN, QWEN_REPO),
    ("/models/llava-1.5-7b-hf/", "hf-tokenprune/llava-1.5-7b-hf-compressor"),
    ("/root/.cache/huggingface/hub/models--llava-hf--llava-onevision-qwen2-0.5b-ov-hf/snapshots/abc123",
     "hf-tokenprune/llava-onevision-qwen2-0.5b-ov-hf-compressor"),
])
def test_default_repo_convention(name_or_path: str, expected: str) -> None:
    assert default_compressor_repo(name_or_path) == expected


def test_model_without_a_name_gets_the_how_to(built) -> None:
    with pytest.raises(CompressorNotFoundError, match="no name_or_path.*compressor=<Hub repo id.*scorer='attention'"):
        default_compressor_repo(built("qwen2_vl")[0])


def test_default_compressor_is_found_in_the_offline_cache(built, hub_cache: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    compressor = Compressor(**SMALL, base_model_type="qwen2_vl", base_model_name=QWEN)
    cache_compressor(hub_cache, QWEN_REPO, compressor, tmp_path)
    model = built("qwen2_vl")[0]
    monkeypatch.setattr(model.config, "_name_or_path", QWEN)
    assert default_compressor_repo(model) == QWEN_REPO
    prune_wrap(model, ratio=0.5)  # the default scorer, no compressor=: the repo's compressor, no warning
    loaded = model.tokenprune.scorer.compressor
    features = torch.rand(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(features), compressor(features), rtol=0, atol=0)


def test_missing_default_compressor_names_the_repo_and_the_way_out(built, hub_cache: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model = built("qwen2_vl")[0]
    monkeypatch.setattr(model.config, "_name_or_path", QWEN)
    with pytest.raises(CompressorNotFoundError) as info:
        prune_wrap(model, ratio=0.5, scorer="compressor")
    message = str(info.value)
    for part in (QWEN_REPO, "hf-tokenprune label", "hf-tokenprune train", "scorer='attention'", "compressor=<"):
        assert part in message
    assert isinstance(info.value, ValueError) and "tokenprune" not in model.__dict__


@pytest.mark.parametrize("kind", ["image", "video"])
def test_ratio_one_needs_no_compressor_and_equals_the_unwrapped_model(built, hub_cache: Path, kind: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """At ``ratio=1.0`` (fixed budget) nothing is scored: no compressor is looked up (the default repo is not in the
    offline cache) and ``generate`` is the unwrapped model's, tokens and logits bit-equal."""
    from conftest import greedy, make_inputs

    model, processor = built("qwen2_vl")
    monkeypatch.setattr(model.config, "_name_or_path", QWEN)
    inputs = make_inputs(processor, kind)
    reference = greedy(model, inputs, steps=4)
    prune_wrap(model, ratio=1.0, scorer="compressor")  # no compressor=
    assert model.tokenprune.scorer is None
    out = greedy(model, inputs, steps=4)
    assert model.tokenprune.last_stats is None
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits, strict=True))
    with pytest.raises(CompressorNotFoundError):  # pruning needs the compressor again
        prune_wrap(model, ratio=0.5, scorer="compressor")


@pytest.fixture
def unwarned(monkeypatch: pytest.MonkeyPatch) -> None:
    """No model told yet that it has no compressor (the session's models are shared between tests)."""
    monkeypatch.setattr(methods, "_WARNED", weakref.WeakSet())


def fallback_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, NoCompressorWarning)]


@pytest.mark.parametrize("named", [True, False])
def test_no_compressor_anywhere_offline_prunes_with_the_fallback_and_warns_once(
        built, hub_cache: Path, unwarned: None, monkeypatch: pytest.MonkeyPatch, named: bool) -> None:
    """``prune_wrap(model, ratio=0.25)`` with ``HF_HUB_OFFLINE=1`` and no compressor anywhere: one warning that names
    the model, the repo looked for, the fallback and how to train one; then it generates, keeping exactly the tokens
    ``scorer=FALLBACK_SCORER`` keeps; wrapping and generating again does not warn again."""
    from conftest import make_inputs

    model, processor = built("qwen2_vl")
    if named:
        monkeypatch.setattr(model.config, "_name_or_path", QWEN)
    inputs = make_inputs(processor, "image", batch=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        prune_wrap(model, ratio=0.25)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        prune_wrap(model, ratio=0.5)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    (message,) = fallback_warnings(record)
    looked_for = (QWEN, QWEN_REPO, "HF_HUB_OFFLINE") if named else ("Qwen2VLForConditionalGeneration has no name",)
    for part in (*looked_for, f"training-free scorer {FALLBACK_SCORER!r}", "hf-tokenprune label",
                 "hf-tokenprune train", "docs/compressors.md", "docs/results.md"):
        assert part in message
    assert model.tokenprune.config.scorer is None
    assert model.tokenprune.last_stats.scorer == f"{FALLBACK_SCORER} (no compressor found)"
    fallback = model.tokenprune.last_stats.kept_indices
    prune_wrap(model, ratio=0.5, scorer=FALLBACK_SCORER)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert all(len(k) > 0 for k in fallback)
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b))
               for a, b in zip(fallback, model.tokenprune.last_stats.kept_indices, strict=True))


def test_no_compressor_with_the_dynamic_budget_falls_back_to_a_relevance_distribution(
        built, hub_cache: Path, unwarned: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import make_inputs

    model, processor = built("qwen2_vl")
    monkeypatch.setattr(model.config, "_name_or_path", QWEN)
    with pytest.warns(NoCompressorWarning, match=f"training-free scorer {AUTO_FALLBACK_SCORER!r}"):
        prune_wrap(model, budget="auto", mass=0.5)
    with torch.no_grad():
        model.generate(**make_inputs(processor, "image", batch=2), max_new_tokens=1, do_sample=False)
    assert model.tokenprune.last_stats.scorer == f"{AUTO_FALLBACK_SCORER} (no compressor found)"


def test_an_explicit_compressor_that_is_not_there_raises_with_the_default_scorer(built, hub_cache: Path,
                                                                                 tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(CompressorNotFoundError, match="does not exist"):
            prune_wrap(built("qwen2_vl")[0], ratio=0.5, compressor=str(tmp_path / "no-compressor"))
    assert fallback_warnings(record) == []


@pytest.fixture
def online_cache(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """:func:`hub_cache`, online."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return hub_cache


def use_endpoint(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Send the Hub's file requests to ``endpoint`` (huggingface_hub builds their URL template at import)."""
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


class FakeHub(BaseHTTPRequestHandler):
    """Answers every file request 404: repo ``*/missing-*`` does not exist, any other repo lacks the file."""

    requests: list[str] = []

    def do_HEAD(self) -> None:  # noqa: N802 - the http.server name
        self.requests.append(f"{self.command} {self.path}")
        missing_repo = self.path.split("/")[2].startswith("missing-")
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound" if missing_repo else "EntryNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_hub(online_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A local Hub that answers 404; yields the requests it got."""
    FakeHub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    use_endpoint(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
    yield FakeHub.requests
    server.shutdown()
    thread.join()


@pytest.mark.parametrize(("repo_id", "problem"), [
    ("me/missing-compressor", "'me/missing-compressor' is not a local directory .* does not exist on the Hub"),
    ("me/not-a-compressor", "Hub repo 'me/not-a-compressor' has no config.json"),
])
def test_a_repo_the_hub_does_not_have_fails_after_one_request(fake_hub: list[str], repo_id: str,
                                                               problem: str) -> None:
    start = time.perf_counter()
    with pytest.raises(CompressorNotFoundError, match=problem):
        Compressor.from_pretrained(repo_id)
    assert time.perf_counter() - start < 3
    assert fake_hub == [f"HEAD /{repo_id}/resolve/main/config.json"]


def test_a_repo_id_fails_fast_when_the_hub_cannot_be_reached_and_loads_from_the_cache_if_there(
        online_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    closed_port_endpoint(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(CompressorNotFoundError) as info:
        load_compressor("my-compressor", None)
    assert time.perf_counter() - start < 3  # no retries
    message = str(info.value)
    for part in ("'my-compressor' is not a local directory", "could not reach the Hugging Face Hub",
                 "not in the local Hub cache", str(online_cache)):
        assert part in message

    compressor = Compressor(**SMALL, base_model_type="qwen2_vl")
    cache_compressor(online_cache, "me/cached-compressor", compressor, tmp_path)
    loaded = Compressor.from_pretrained("me/cached-compressor")
    features = torch.rand(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(features), compressor(features), rtol=0, atol=0)


def test_offline_a_repo_that_is_not_cached_names_the_cache(hub_cache: Path) -> None:
    with pytest.raises(CompressorNotFoundError,
                       match=re.escape(f"'my-compressor' is not in the local Hub cache ({hub_cache}); HF_HUB_OFFLINE")):
        Compressor.from_pretrained("my-compressor")


class FakeApi:
    calls: list = []

    def __init__(self, token: str | None = None) -> None:
        self.calls.append(("init", token))

    def create_repo(self, repo_id: str, **kwargs) -> None:
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return type("Commit", (), {"commit_url": f"https://hf.co/{kwargs['repo_id']}/commit/1"})()


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> list:
    FakeApi.calls = []
    monkeypatch.setattr("hf_tokenprune.hub.HfApi", FakeApi)
    return FakeApi.calls


def trained_dir(path: Path) -> Path:
    Compressor(**SMALL, base_model_type="qwen2_vl").save_pretrained(path)
    (path / "training_log.json").write_text("{}")
    (path / "checkpoint").mkdir()
    (path / "checkpoint" / "training_state.safetensors").write_bytes(b"optimizer state")
    return path


def test_push_uploads_only_the_compressor_files(tmp_path: Path, fake_api: list) -> None:
    directory = trained_dir(tmp_path / "c")
    commit = push_compressor(directory, "me/qwen-compressor", private=True, token="tok", commit_message="v1")
    assert commit.commit_url.startswith("https://hf.co/me/qwen-compressor")
    (_, token), (_, repo_id, create), (_, upload) = fake_api
    assert token == "tok" and repo_id == "me/qwen-compressor"
    assert create == {"repo_type": "model", "private": True, "exist_ok": True}
    assert (upload["repo_id"], upload["folder_path"], upload["commit_message"]) == ("me/qwen-compressor", directory,
                                                                                      "v1")
    on_disk = [str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()]
    sent = set(filter_repo_objects(on_disk, allow_patterns=upload["allow_patterns"]))  # as upload_folder filters
    assert sent == {"config.json", "model.safetensors", "README.md", "training_log.json"}


@pytest.mark.parametrize("damage", ["no_weights", "no_config", "pickle", "bad_config", "missing_dir"])
def test_push_refuses_what_is_not_a_safe_compressor(tmp_path: Path, fake_api: list, damage: str) -> None:
    directory = trained_dir(tmp_path / "c")
    if damage == "no_weights":
        (directory / "model.safetensors").unlink()
    elif damage == "no_config":
        (directory / "config.json").unlink()
    elif damage == "pickle":
        torch.save({}, directory / "checkpoint" / "optimizer.pt")
    elif damage == "bad_config":
        (directory / "config.json").write_text('{"channels": [1000000000]}')
    else:
        directory = tmp_path / "nothing-here"
    with pytest.raises(ValueError, match="pickle|not a valid compressor|not a directory"):
        push_compressor(directory, "me/x")
    assert fake_api == []


def test_cli_push(tmp_path: Path, fake_api: list, capsys: pytest.CaptureFixture) -> None:
    directory = trained_dir(tmp_path / "c")
    assert cli.main(["push", str(directory), "--repo", "me/x", "--private"]) == 0
    assert fake_api[1] == ("create_repo", "me/x", {"repo_type": "model", "private": True, "exist_ok": True})
    assert "https://hf.co/me/x/commit/1" in capsys.readouterr().out


def test_trained_compressor_from_the_offline_cache_selects_like_the_local_directory(
        built, hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train -> Hub layout in an offline cache -> ``prune_wrap(model, ratio)`` with no compressor given keeps
    exactly the tokens the freshly trained local directory keeps."""
    from conftest import make_inputs
    from test_training import TINY, synthetic

    from hf_tokenprune.training import train_compressor

    trained = tmp_path / "trained"
    train_compressor(synthetic(48), trained, epochs=2, seed=0, base_model_type="qwen2_vl", base_model_name=QWEN,
                     **TINY)
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = hub_cache / f"models--{QWEN_REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(trained, repo / "snapshots" / commit)
    model, processor = built("qwen2_vl")
    monkeypatch.setattr(model.config, "_name_or_path", QWEN)
    inputs = make_inputs(processor, "image", batch=2)
    kept = []
    for compressor in (None, str(trained)):
        prune_wrap(model, ratio=0.25, compressor=compressor)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        kept.append(model.tokenprune.last_stats.kept_indices)
    assert all(len(k) > 0 for k in kept[0])
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(*kept, strict=True))


def closed_port_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send the Hub's requests to a local port nobody listens on: every connection is refused, as without network."""
    use_endpoint(monkeypatch, f"http://127.0.0.1:{free_port()}")


def test_no_compressor_and_no_network_falls_back_in_under_3_seconds(built, online_cache: Path, unwarned: None,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Without HF_HUB_OFFLINE and with the Hub unreachable, the default scorer's lookup is one refused request, no
    retries: the fallback is in place in well under the 23 s of huggingface_hub's default retries."""
    model = built("qwen2_vl")[0]
    monkeypatch.setattr(model.config, "_name_or_path", QWEN)
    closed_port_endpoint(monkeypatch)
    start = time.perf_counter()
    with pytest.warns(NoCompressorWarning, match=re.escape(QWEN_REPO) + ".*could not reach the Hugging Face Hub"):
        prune_wrap(model, ratio=0.25)
    assert time.perf_counter() - start < 3
    assert model.tokenprune.scorer.name == FALLBACK_SCORER


def test_no_compressor_on_a_hub_without_the_repo_falls_back_after_one_request(
        built, fake_hub: list[str], unwarned: None, monkeypatch: pytest.MonkeyPatch) -> None:
    model = built("qwen2_vl")[0]
    monkeypatch.setattr(model.config, "_name_or_path", "me/missing-model")
    with pytest.warns(NoCompressorWarning, match="does not exist on the Hub"):
        prune_wrap(model, ratio=0.25)
    assert fake_hub == ["HEAD /hf-tokenprune/missing-model-compressor/resolve/main/config.json"]
