"""Compressors on the Hugging Face Hub: where a model's compressor is looked up, how one is loaded and uploaded.

Naming convention (docs/compressors.md): the compressor of a model whose ``name_or_path`` ends in ``<name>`` lives
in the Hub repo ``hf-tokenprune/<name>-compressor``, e.g. ``Qwen/Qwen2-VL-2B-Instruct`` ->
``hf-tokenprune/Qwen2-VL-2B-Instruct-compressor``. ``prune_wrap(model, ratio=...)`` with ``scorer="compressor"``
and no ``compressor=`` loads that repo (from the local cache when ``HF_HUB_OFFLINE=1``); with the default scorer
(None) it falls back to a training-free scorer when the repo is not found (:mod:`hf_tokenprune.methods`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn

from .compressor import _PICKLE_SUFFIXES, Compressor, CompressorNotFoundError

__all__ = ["DEFAULT_ORG", "PUSHED_FILES", "CompressorNotFoundError", "default_compressor_repo",
           "find_default_compressor", "load_compressor", "push_compressor"]

DEFAULT_ORG = "hf-tokenprune"
# what push_compressor uploads from a compressor directory (the training checkpoint stays local)
PUSHED_FILES = (constants.CONFIG_NAME, constants.SAFETENSORS_SINGLE_FILE, "README.md", "training_log.json")
_HOW_TO = ("pass compressor=<Hub repo id | local directory | Compressor>, train one (`hf-tokenprune label --model "
           "<model> --data <data> --out labels/`, then `hf-tokenprune train --labels labels/ --out compressor/`), "
           "or choose a training-free scorer such as scorer='attention'")


def _model_name(model: nn.Module | str) -> str:
    if isinstance(model, str):
        return model
    return getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "") or ""


def default_compressor_repo(model: nn.Module | str, *, org: str = DEFAULT_ORG) -> str:
    """The conventional Hub repo of a model's compressor: ``{org}/{name}-compressor``.

    ``name`` is the last component of the model's ``name_or_path`` (a Hub id or a local directory); for a
    directory inside the Hub cache (``models--{owner}--{name}/snapshots/{revision}``) it is the cached repo's name.

    Raises:
        CompressorNotFoundError: the model has no ``name_or_path`` (built in code) or the name gives no valid
            repo id.
    """
    name_or_path = _model_name(model).rstrip("/\\")
    if not name_or_path:
        raise CompressorNotFoundError(f"the model has no name_or_path, so no default compressor repo can be "
                                      f"derived for it; {_HOW_TO}")
    cached = re.search(r"models--[^/\\]+--([^/\\]+)[/\\]snapshots", name_or_path)
    name = cached.group(1) if cached else re.split(r"[/\\]", name_or_path)[-1]
    repo_id = f"{org}/{name}-compressor"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise CompressorNotFoundError(f"model {name_or_path!r} gives no valid default compressor repo id "
                                      f"({err}); {_HOW_TO}") from err
    return repo_id


def load_compressor(compressor: str | os.PathLike | Compressor | None, model: nn.Module) -> Compressor:
    """The compressor ``TokenPruneConfig.compressor`` names for ``model``: a Hub repo id or local directory through
    :meth:`Compressor.from_pretrained`, None as :func:`default_compressor_repo`, a :class:`Compressor` as is.

    Raises:
        CompressorNotFoundError: the named directory or repo cannot be loaded (see
            :meth:`Compressor.from_pretrained`), or ``compressor`` is None and the default repo cannot be (not on the
            Hub, not in the cache when offline, no network). The message names what was looked for and where.
    """
    if isinstance(compressor, (str, os.PathLike)):
        return Compressor.from_pretrained(compressor)
    if compressor is not None:
        return compressor
    default_compressor_repo(model)  # a model without a usable name: its own error, with the how-to
    try:
        return find_default_compressor(model)
    except CompressorNotFoundError as err:
        raise CompressorNotFoundError(
            f"scorer='compressor' without compressor=: {err}. To use one, {_HOW_TO}; publish a trained one with "
            "`hf-tokenprune push compressor/ --repo <repo id>`."
        ) from err


def find_default_compressor(model: nn.Module) -> Compressor:
    """The compressor in ``model``'s :func:`default_compressor_repo` (from the local Hub cache when offline; one
    request without retries otherwise: :meth:`Compressor.from_pretrained`).

    Raises:
        CompressorNotFoundError: none there; the message names the model, the repo looked for (or why there is
            none: no ``name_or_path``) and why it was not found, and gives no advice.
    """
    try:
        repo_id = default_compressor_repo(model)
    except CompressorNotFoundError as err:
        raise CompressorNotFoundError(f"{type(model).__name__} has no name_or_path (built in code) or one that "
                                      "gives no valid Hub repo id, so no default compressor repo was looked "
                                      "for") from err
    try:
        return Compressor.from_pretrained(repo_id)
    except OSError as err:  # CompressorNotFoundError, and any other I/O error on the way
        raise CompressorNotFoundError(
            f"no compressor found for model {_model_name(model)!r} at its default Hub repo {repo_id!r} "
            f"({type(err).__name__}: {err})"
        ) from err


def push_compressor(directory: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
                    commit_message: str = "Upload hf_tokenprune compressor") -> CommitInfo:
    """Upload a compressor directory's :data:`PUSHED_FILES` to the Hub model repo ``repo_id`` (created if needed).

    Raises:
        ValueError: the directory is not a loadable compressor (``config.json`` / ``model.safetensors`` missing
            or invalid) or holds a pickle file anywhere; nothing is uploaded then.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    pickles = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{directory} holds pickle files ({', '.join(pickles)}); compressors are shared as "
                         "safetensors only. Remove them before pushing.")
    try:
        Compressor.from_pretrained(directory)
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{directory} is not a valid compressor directory: {err}") from err
    files = [name for name in PUSHED_FILES if (directory / name).is_file()]
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=directory, allow_patterns=files,
                             commit_message=commit_message)
