"""The lightweight compressor f_theta: first-layer attention of each visual token -> relevance distribution.

A stack of depthwise-separable 1-D convolutions runs over the visual-token sequence (one float per token) and
emits one logit per token; :meth:`Compressor.relevance` turns the logits into a distribution over the valid
tokens. Padded batches give the same outputs at valid positions as each sample alone.

Input normalisation: ``x = log(A / mean_valid(A) + 1e-6)``, i.e. each token's attention relative to the
uniform share over the sample's valid tokens. This makes the input invariant to the overall scale of ``A``
(which shrinks like 1/L with the context length) and to the number of visual tokens ``N`` (uniform attention
maps to 0 whatever ``N``), while keeping how peaked the attention is. Negative inputs are clamped to 0.

Input feature: ``"first_layer_attention"`` (``A^0_v``, one input channel, the paper's),
``"first_layer_head_attention"`` (the same attention of each of the first layer's ``in_channels`` query heads,
not averaged: ``[B, H, N]``, each channel normalised alone; same cost), both computed by the compressor scorer at
inference, or, for the multi-layer ablation, ``"layer_attention"``: the attention of the first ``in_channels``
LLM layers stacked as channels (``[B, K, N]``; training only).

Serialisation goes through :class:`huggingface_hub.PyTorchModelHubMixin` (``save_pretrained``,
``from_pretrained``, ``push_to_hub``): ``config.json`` plus ``model.safetensors``. Loading is stricter than
the mixin's default: ``config.json`` is required, weights must match exactly (``strict=True``) and pickle
checkpoints (``pytorch_model.bin``) are refused instead of being used as a fallback. A compressor directory or
repo is untrusted input: every config field is validated before anything is allocated, and the safetensors header
(tensor names, shapes, floating dtypes) is checked against the model the config describes before any weight is
read, and the weights must be finite. Anything invalid raises :class:`InvalidCompressorError` naming the file and
the field or tensor.

Calibration (``budget="auto"``): :func:`hf_tokenprune.calibrate` picks the relevance-mass threshold that gives a
target mean retention on a calibration set; :func:`hf_tokenprune.save_calibration` writes it to ``config.json`` as
the ``calibration`` field (absent when the compressor is not calibrated), validated on load like every field.
"""

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import (
    PyTorchModelHubMixin,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .atomic import default_mode
from .config import TokenPruneConfig, check_fraction

__all__ = ["CALIBRATION_FIELDS", "Compressor", "CompressorMismatchError", "CompressorNotFoundError",
           "DepthwiseSeparableConv1d", "FEATURES", "INFERENCE_FEATURES", "InvalidCompressorError",
           "validate_calibration"]

INFERENCE_FEATURES = ("first_layer_attention", "first_layer_head_attention")  # what pruning computes
FEATURES = (*INFERENCE_FEATURES, "layer_attention")
MAX_CHANNELS = 4096
MAX_LAYERS = 16
MAX_KERNEL_SIZE = 63
_INPUT_EPS = 1e-6
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# the ``calibration`` field of config.json: the threshold, the clamp, scope and temperature it was chosen for, and
# the target, the retention it achieved and on how many samples
CALIBRATION_FIELDS = ("mass", "min_ratio", "max_ratio", "min_tokens", "scope", "temperature", "target", "retention",
                      "samples")
CALIBRATION_DEFAULTS = {"temperature": 1.0}  # fields that calibrations saved before them lack


class CompressorMismatchError(ValueError):
    """The compressor was trained for a different base model family than the one it is applied to."""


class InvalidCompressorError(ValueError):
    """A compressor directory or Hub repo whose ``config.json`` or ``model.safetensors`` is invalid (the message
    names the file and the field or tensor)."""


class CompressorNotFoundError(ValueError, FileNotFoundError):
    """No compressor where one was looked for: a directory that does not exist or lacks ``config.json`` /
    ``model.safetensors``, a Hub repo that does not exist or lacks them, or a Hub that cannot be reached with the repo
    not in the local cache. The message says what was looked for and where."""


def _is_local(name: str | os.PathLike) -> bool:
    """Whether ``name`` can only mean a local directory: a path object, an existing path, anything that is no valid
    Hub repo id (``./x``, ``../x``, ``/x``, ``~/x``, ``a/b/c``, backslashes, ...), or ``a/b`` where ``a`` is a local
    directory."""
    if not isinstance(name, str) or os.path.exists(name):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return "/" in name and os.path.isdir(name.split("/", 1)[0])


def _hub_lookup(repo_id: str, *, revision: str | None, cache_dir: str | Path | None, token: str | bool | None,
                local_files_only: bool) -> bool:
    """Ask the Hub for ``repo_id``'s ``config.json`` with one request (timeout ``HF_HUB_ETAG_TIMEOUT``, no retries);
    return whether to load from the local Hub cache only: offline (``HF_HUB_OFFLINE`` or ``local_files_only``), or the
    Hub unreachable and the repo cached.

    Raises:
        CompressorNotFoundError: the Hub has no such repo, revision or ``config.json``, or the repo is not cached and
            the Hub cannot be asked.
    """
    where = f"{repo_id!r} is not a local directory (nothing at {os.path.abspath(repo_id)}) and Hub repo {repo_id!r}"
    cache = cache_dir or constants.HF_HUB_CACHE
    cached = isinstance(try_to_load_from_cache(repo_id, constants.CONFIG_NAME, cache_dir=cache_dir, revision=revision),
                        str)
    if local_files_only or constants.HF_HUB_OFFLINE:
        if cached:
            return True
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "local_files_only=True"
        raise CompressorNotFoundError(f"{where} is not in the local Hub cache ({cache}); {why}")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, constants.CONFIG_NAME, revision=revision), token=token,
                             timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except RepositoryNotFoundError as err:
        raise CompressorNotFoundError(f"{where} does not exist on the Hub (or is private or gated and you are not "
                                      "logged in: `hf auth login`)") from err
    except RevisionNotFoundError as err:
        raise CompressorNotFoundError(f"Hub repo {repo_id!r} has no revision {revision!r}") from err
    except RemoteEntryNotFoundError as err:
        raise CompressorNotFoundError(f"Hub repo {repo_id!r} has no {constants.CONFIG_NAME}: it is not a "
                                      "compressor") from err
    except Exception as err:  # no connection, a timeout, a Hub error: the Hub cannot answer now
        if cached:
            return True
        raise CompressorNotFoundError(f"{where} could not be looked up: could not reach the Hugging Face Hub "
                                      f"({type(err).__name__}: {err}) and the repo is not in the local Hub cache "
                                      f"({cache})") from err
    return False


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _check_weights(model: nn.Module, model_file: str) -> None:
    """Compare the safetensors header with ``model``'s parameters (names, shapes, floating dtypes); reads no data."""
    name = os.path.basename(model_file)
    try:
        with safe_open(model_file, framework="pt") as f:
            header = {key: (f.get_slice(key).get_shape(), f.get_slice(key).get_dtype()) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise InvalidCompressorError(f"{name} is not a readable safetensors file: {err}") from err
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise InvalidCompressorError(f"{name} does not match config.json: missing tensors {missing}, unexpected "
                                     f"tensors {unexpected}")
    for key, (shape, dtype) in header.items():
        if list(shape) != list(expected[key].shape):
            raise InvalidCompressorError(f"{name}: tensor {key!r} has shape {list(shape)}, config.json gives "
                                         f"{list(expected[key].shape)}")
        if dtype not in _FLOAT_DTYPES:
            raise InvalidCompressorError(f"{name}: tensor {key!r} has dtype {dtype}; expected a floating dtype "
                                         f"({', '.join(_FLOAT_DTYPES)})")


def _basename(name: str) -> str:
    """``"org/model"``, ``"/path/to/model/"`` -> ``"model"``."""
    return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


class DepthwiseSeparableConv1d(nn.Module):
    """Depthwise ``Conv1d(c_in, c_in, k, groups=c_in, padding='same')``, pointwise ``Conv1d(c_in, c_out, 1)``,
    per-position LayerNorm over channels, GELU; padded positions are zeroed on output."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv1d(in_channels, in_channels, kernel_size, padding="same", groups=in_channels)
        self.pointwise = nn.Conv1d(in_channels, out_channels, 1)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """``x``: ``[B, C_in, N]`` with zeros at padded positions; ``keep``: ``[B, 1, N]`` bool."""
        x = self.pointwise(self.depthwise(x))
        x = F.gelu(self.norm(x.transpose(1, 2)).transpose(1, 2))
        return x.masked_fill(~keep, 0.0)


def _validate_config(channels: object, kernel_size: object, base_model_type: object,
                     base_model_name: object, feature: object, in_channels: object) -> tuple[int, ...]:
    """Raise ValueError naming the offending field; return ``channels`` as a tuple."""
    if not isinstance(channels, (list, tuple)) or not channels:
        raise ValueError(f"channels must be a non-empty list of ints, got {channels!r}")
    if len(channels) > MAX_LAYERS:
        raise ValueError(f"channels has {len(channels)} entries; at most {MAX_LAYERS} layers are allowed")
    for c in channels:
        if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= MAX_CHANNELS:
            raise ValueError(f"channels entries must be ints in [1, {MAX_CHANNELS}], got {c!r} in {channels}")
    if (isinstance(kernel_size, bool) or not isinstance(kernel_size, int)
            or not 1 <= kernel_size <= MAX_KERNEL_SIZE or kernel_size % 2 == 0):
        raise ValueError(f"kernel_size must be an odd int in [1, {MAX_KERNEL_SIZE}], got {kernel_size!r}")
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or not 1 <= in_channels <= MAX_CHANNELS:
        raise ValueError(f"in_channels must be an int in [1, {MAX_CHANNELS}], got {in_channels!r}")
    if feature != "first_layer_head_attention" and (feature == "first_layer_attention") != (in_channels == 1):
        raise ValueError(f"in_channels={in_channels} does not fit feature={feature!r}: first_layer_attention has "
                         "1 channel, layer_attention one per layer (>= 2), first_layer_head_attention one per head")
    for name, value in (("base_model_type", base_model_type), ("base_model_name", base_model_name)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a str or None, got {type(value).__name__} {value!r}")
    return tuple(channels)


def validate_calibration(calibration: object) -> dict:
    """``calibration`` as a plain dict of :data:`CALIBRATION_FIELDS`, or a ValueError naming the field.

    ``mass``, ``min_ratio``, ``max_ratio``, ``min_tokens``, ``scope`` and ``temperature`` (1 when absent, as in
    calibrations saved before it existed) are checked as :class:`TokenPruneConfig` checks them; ``target`` and
    ``retention`` (the target and the achieved mean retention) are fractions in (0, 1],
    ``samples`` (calibration samples) an int >= 1.
    """
    if not isinstance(calibration, Mapping):
        raise ValueError(f"calibration must be an object with fields {', '.join(CALIBRATION_FIELDS)}, "
                        f"got {type(calibration).__name__}")
    calibration = {**CALIBRATION_DEFAULTS, **calibration}
    missing = [k for k in CALIBRATION_FIELDS if k not in calibration]
    unknown = sorted(str(k) for k in calibration if k not in CALIBRATION_FIELDS)
    if missing or unknown:
        raise ValueError(f"calibration: missing fields {missing}, unknown fields {unknown}")
    out = {k: calibration[k] for k in CALIBRATION_FIELDS}
    try:
        TokenPruneConfig(budget="auto", scorer="compressor", mass=out["mass"], min_ratio=out["min_ratio"],
                         max_ratio=out["max_ratio"], min_tokens=out["min_tokens"], scope=out["scope"],
                         temperature=out["temperature"])
        out["target"], out["retention"] = check_fraction("target", out["target"]), check_fraction(
            "retention", out["retention"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"calibration: {err}") from err
    if isinstance(out["samples"], bool) or not isinstance(out["samples"], int) or out["samples"] < 1:
        raise ValueError(f"calibration: samples must be an int >= 1, got {out['samples']!r}")
    for name in ("mass", "min_ratio", "max_ratio", "temperature"):
        out[name] = float(out[name])
    return out


class Compressor(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="hf_tokenprune",
    tags=["token-pruning", "vision-language"],
    repo_url=None,
):
    """Maps per-visual-token first-layer attention ``[B, N]`` (or ``[B, K, N]``) to relevance logits ``[B, N]``.

    Args:
        channels: output channels of the depthwise-separable layers (one layer per entry). The scalar input is
            first lifted to ``channels[0]`` channels by a pointwise convolution.
        kernel_size: odd kernel size of the depthwise convolutions.
        base_model_type: ``config.model_type`` of the model the compressor was trained for (e.g. ``"llava"``).
        base_model_name: Hub id of that model, informational.
        feature: the input feature, ``"first_layer_attention"``, ``"first_layer_head_attention"`` or
            ``"layer_attention"`` (multi-layer ablation).
        in_channels: input channels: 1 for ``"first_layer_attention"``, the first layer's query heads for
            ``"first_layer_head_attention"``, the number of layers for ``"layer_attention"``. Written to
            ``config.json`` only when it is not 1.
        calibration: the ``budget="auto"`` threshold (:func:`validate_calibration` fields), or None. Written to
            ``config.json`` only when set; see :meth:`set_calibration`.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 128, 256, 512),
        kernel_size: int = 5,
        base_model_type: str | None = None,
        base_model_name: str | None = None,
        feature: str = "first_layer_attention",
        in_channels: int = 1,
        calibration: Mapping | None = None,
    ) -> None:
        channels = _validate_config(channels, kernel_size, base_model_type, base_model_name, feature, in_channels)
        calibration = None if calibration is None else validate_calibration(calibration)
        super().__init__()
        self.channels = channels
        self.kernel_size = kernel_size
        self.base_model_type = base_model_type
        self.base_model_name = base_model_name
        self.feature = feature
        self.in_channels = in_channels
        if in_channels == 1:  # keep single-feature configs as they were before the field existed
            self._hub_mixin_config.pop("in_channels", None)
        self.set_calibration(calibration)
        self.lift = nn.Conv1d(in_channels, channels[0], 1)
        self.blocks = nn.ModuleList(
            DepthwiseSeparableConv1d(c_in, c_out, kernel_size)
            for c_in, c_out in zip((channels[0], *channels[:-1]), channels, strict=True)
        )
        self.head = nn.Conv1d(channels[-1], 1, 1)

    def set_calibration(self, calibration: Mapping | None) -> None:
        """Set (validated) or clear the ``budget="auto"`` calibration; :meth:`save_pretrained` writes it."""
        self.calibration = None if calibration is None else validate_calibration(calibration)
        if self.calibration is None:
            self._hub_mixin_config.pop("calibration", None)
        else:
            self._hub_mixin_config["calibration"] = self.calibration

    def _check_inputs(self, features: Tensor, mask: Tensor | None) -> Tensor:
        """Validate shapes and return a bool mask (all True when ``mask`` is None)."""
        if self.in_channels == 1 and features.dim() != 2:
            raise ValueError(f"features must have shape [batch, n_visual], got {tuple(features.shape)}")
        if self.in_channels > 1 and (features.dim() != 3 or features.shape[1] != self.in_channels):
            raise ValueError(f"features must have shape [batch, {self.in_channels}, n_visual], "
                             f"got {tuple(features.shape)}")
        shape = (features.shape[0], features.shape[-1])
        if mask is None:
            return torch.ones(shape, dtype=torch.bool, device=features.device)
        if mask.shape != shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from features {tuple(features.shape)}")
        mask = mask.to(device=features.device, dtype=torch.bool)
        if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
            raise ValueError("mask must be right-padded: valid (True) positions first, padding at the end")
        return mask

    @staticmethod
    def normalize_features(features: Tensor, mask: Tensor) -> Tensor:
        """``log(A / mean_valid(A) + 1e-6)`` in float32 per row (and channel), 0 at padded positions.

        ``features``: ``[B, N]`` or ``[B, K, N]``; ``mask``: ``[B, N]``."""
        if features.dim() == 3:
            mask = mask.unsqueeze(1)
        a = torch.where(mask, features.float().clamp_min(0.0), 0.0)
        mean = a.sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp_min(1)
        x = torch.log(a / mean.clamp_min(torch.finfo(torch.float32).tiny) + _INPUT_EPS)
        return torch.where(mask, x, 0.0)

    def forward(self, features: Tensor, mask: Tensor | None = None) -> Tensor:
        """Relevance logits.

        Args:
            features: ``[B, N]`` first-layer instruction->vision attention of each visual token (``[B, K, N]``
                for ``in_channels=K > 1``).
            mask: ``[B, N]`` bool, True at valid tokens, padding at the end of each row; None = all valid.

        Returns:
            ``[B, N]`` logits in the parameters' dtype, ``-inf`` at padded positions.
        """
        mask = self._check_inputs(features, mask)
        return self._logits(features, mask)

    def _logits(self, features: Tensor, mask: Tensor) -> Tensor:
        """:meth:`forward` for an already validated bool ``mask``."""
        keep = mask.unsqueeze(1)
        x = self.normalize_features(features, mask).to(self.head.weight.dtype)
        if x.dim() == 2:
            x = x.unsqueeze(1)
        x = self.lift(x).masked_fill(~keep, 0.0)
        for block in self.blocks:
            x = block(x, keep)
        return self.head(x).squeeze(1).masked_fill(~mask, float("-inf"))

    def relevance(self, features: Tensor, mask: Tensor | None = None) -> Tensor:
        """Softmax of the logits over each row's valid tokens: ``[B, N]``, rows sum to 1, 0 at padded
        positions (an all-padding row is all 0)."""
        mask = self._check_inputs(features, mask)
        logits = self._logits(features, mask)
        # a finite fill keeps the softmax of an all-padding row NaN-free (uniform, then zeroed below)
        probs = torch.softmax(logits.masked_fill(~mask, torch.finfo(logits.dtype).min), dim=-1)
        return probs.masked_fill(~mask, 0.0)

    def check_compatible(self, model_type: str, model_name: str | None = None, *,
                         allow_mismatch: bool = False) -> None:
        """Refuse to score tokens of a model family the compressor was not trained for.

        Raises:
            CompressorMismatchError: ``base_model_type`` is set, differs from ``model_type`` and
                ``allow_mismatch`` is False. A differing ``base_model_name`` only warns; names are compared by
                their last path component, so a Hub id and a local copy of the same model agree.
        """
        if self.base_model_type is not None and self.base_model_type != model_type and not allow_mismatch:
            raise CompressorMismatchError(
                f"this compressor was trained for model_type {self.base_model_type!r} but the model has "
                f"model_type {model_type!r}; its relevance scores are unlikely to transfer. To use it anyway "
                "pass allow_mismatch=True (TokenPruneConfig(allow_compressor_mismatch=True))."
            )
        if (self.base_model_name is not None and model_name is not None
                and _basename(self.base_model_name) != _basename(model_name)):
            warnings.warn(
                f"compressor was trained on {self.base_model_name!r}, applying it to {model_name!r}",
                stacklevel=2,
            )

    def _save_pretrained(self, save_directory: Path) -> None:
        """The mixin's ``model.safetensors``, with the permissions of any new file (``0o666`` less the umask): the
        safetensors writer creates it ``0o600``."""
        super()._save_pretrained(save_directory)
        default_mode(Path(save_directory) / constants.SAFETENSORS_SINGLE_FILE)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> "Compressor":
        """:meth:`PyTorchModelHubMixin.from_pretrained` (a Hub repo id or a local directory), validated.

        A path object, an existing path or a name that is no valid repo id (``./x``, ``/x``, ``~/x``, ``a/b/c``) is
        a local directory and never looked up on the Hub. A repo id is looked up with one request and no retries
        (timeout ``HF_HUB_ETAG_TIMEOUT``); offline (``HF_HUB_OFFLINE=1``) or when the Hub cannot be reached it is
        loaded from the local Hub cache.

        Raises:
            InvalidCompressorError: ``config.json`` is not a JSON object of valid fields, or ``model.safetensors``
                is unreadable or does not match it.
            CompressorNotFoundError: the directory or repo does not exist, ``config.json`` or ``model.safetensors``
                is missing (pickles are never loaded), or the Hub cannot be reached and the repo is not cached.
        """
        if _is_local(pretrained_model_name_or_path):
            path = Path(pretrained_model_name_or_path).expanduser()
            if not path.is_dir():
                problem = "is not a directory" if path.exists() else "does not exist"
                raise CompressorNotFoundError(f"compressor directory {str(pretrained_model_name_or_path)!r} {problem} "
                                              f"({path.resolve()})")
            pretrained_model_name_or_path = path
        else:
            kwargs["local_files_only"] = _hub_lookup(
                pretrained_model_name_or_path, revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"),
                token=kwargs.get("token"), local_files_only=kwargs.get("local_files_only", False))
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            # AttributeError: the mixin calls config.items() on whatever JSON value config.json holds
            raise InvalidCompressorError(f"{constants.CONFIG_NAME} of compressor {str(pretrained_model_name_or_path)!r}"
                                         f" is not a JSON object of compressor fields: {err}") from err

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        config: dict | None = None,
        **model_kwargs,
    ) -> "Compressor":
        """Load ``model.safetensors`` (never a pickle) into a model built from ``config.json``.

        Overrides the mixin, which would fall back to ``pytorch_model.bin``, load with ``strict=False`` and
        build a default model when ``config.json`` is missing.
        """
        source = (f"compressor directory {model_id!r} ({os.path.abspath(model_id)})" if os.path.isdir(model_id)
                  else f"Hub repo {model_id!r}")
        if config is None:
            raise CompressorNotFoundError(f"{source} has no {constants.CONFIG_NAME}")
        weights_name = constants.SAFETENSORS_SINGLE_FILE
        refusal = (f"hf_tokenprune only loads compressor weights from {weights_name}; pickle checkpoints "
                   "(pytorch_model.bin, *.pt) are refused because unpickling can run arbitrary code. "
                   "Convert the weights with safetensors.torch.save_model and retry.")
        if os.path.isdir(model_id):
            model_file = os.path.join(model_id, weights_name)
            if not os.path.isfile(model_file):
                pickles = sorted(f for f in os.listdir(model_id) if f.endswith(_PICKLE_SUFFIXES))
                found = f" (found {', '.join(pickles)})" if pickles else ""
                raise CompressorNotFoundError(f"{source} has no {weights_name}{found}. {refusal}")
        else:
            try:
                model_file = hf_hub_download(
                    repo_id=model_id,
                    filename=weights_name,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    token=token,
                    local_files_only=local_files_only,
                )
            except RemoteEntryNotFoundError as err:
                raise CompressorNotFoundError(f"{source} has no {weights_name}. {refusal}") from err
            except LocalEntryNotFoundError as err:
                raise CompressorNotFoundError(
                    f"{weights_name} of {model_id!r} is not in the local Hub cache and the Hub was not "
                    "reached (offline mode or no connection). Pickle checkpoints are never used as a "
                    f"fallback. ({err})"
                ) from err
        try:
            model = cls(**model_kwargs)
        except ValueError as err:
            raise InvalidCompressorError(f"{constants.CONFIG_NAME} of compressor {model_id!r}: {err}") from err
        _check_weights(model, model_file)
        try:
            model = cls._load_as_safetensor(model, model_file, map_location, strict)
        except SafetensorError as err:
            raise InvalidCompressorError(f"{weights_name} of compressor {model_id!r} is not readable: {err}") from err
        for name, tensor in model.state_dict().items():
            if not bool(torch.isfinite(tensor).all()):
                raise InvalidCompressorError(f"{weights_name} of compressor {model_id!r}: tensor {name!r} holds "
                                             "non-finite values (NaN or inf)")
        return model
