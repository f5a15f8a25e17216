"""Train a :class:`~hf_tokenprune.Compressor` on stored labels: ``KL(R*_v || softmax(f_theta(A^0_v)))`` with Adam.

``out_dir`` ends up a compressor directory (``config.json`` + ``model.safetensors`` of the epoch with the lowest
validation KL, ``README.md`` model card, ``training_log.json``) plus ``checkpoint/training_state.safetensors``: the
last epoch's weights, Adam state, torch RNG state and the run's settings and history (all tensors in safetensors,
the rest as JSON in its metadata; written atomically every epoch). ``resume=True`` continues from it.

Runs in one plain process or under ``accelerate launch`` (data-parallel; the main process writes).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import save
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..atomic import write_atomic
from ..compressor import Compressor
from .card import model_card
from .data import EpochShuffle, LabelDataset, collate, is_validation, record_feature
from .evaluation import attention_scores, compressor_scores, evaluate_scores, log_q
from .metrics import METRICS, kl_divergence
from .processes import cpu_only
from .result import TrainResult
from .store import LabelRecord, load_records

__all__ = ["DEPTH_CHANNELS", "TrainResult", "train_compressor"]

# Channel schedules of the depth ablation (3 / 5 / 7 / 10 depthwise-separable layers); 5 is the paper's network.
DEPTH_CHANNELS: dict[int, tuple[int, ...]] = {
    3: (32, 128, 512),
    5: (32, 64, 128, 256, 512),
    7: (32, 64, 128, 256, 512, 512, 512),
    10: (32, 32, 64, 64, 128, 128, 256, 256, 512, 512),
}
CHECKPOINT = Path("checkpoint") / "training_state.safetensors"
# settings that must match for resume=True (epochs may grow)
_RESUME_KEYS = ("channels", "kernel_size", "feature", "in_channels", "batch_size", "lr", "val_fraction", "seed",
                "base_model_type", "base_model_name", "data")


def _fingerprint(ids: Sequence[str]) -> str:
    """Short hash of the sample ids (with ``val_fraction`` it fixes the split)."""
    return hashlib.sha256("\0".join(ids).encode()).hexdigest()[:16]


def _save_checkpoint(path: Path, model: Compressor, optimizer: torch.optim.Optimizer, state: dict) -> None:
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim = optimizer.state_dict()
    for i, param_state in optim["state"].items():
        tensors.update({f"optimizer/{i}/{k}": v.detach().cpu().contiguous() for k, v in param_state.items()})
    tensors["rng/torch"] = torch.get_rng_state()
    metadata = {"state": json.dumps(state), "param_groups": json.dumps(optim["param_groups"])}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save(tensors, metadata=metadata))


def _load_checkpoint(path: Path, model: Compressor, optimizer: torch.optim.Optimizer) -> dict:
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")}, strict=True)
    optim_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, i, name = key.split("/", 2)
            optim_state.setdefault(int(i), {})[name] = value
    optimizer.load_state_dict({"state": optim_state, "param_groups": json.loads(metadata["param_groups"])})
    torch.set_rng_state(tensors["rng/torch"])
    return json.loads(metadata["state"])


def _default_accelerator() -> Accelerator:
    return Accelerator(cpu=cpu_only())


def _save_compressor(model: Compressor, out_dir: Path) -> None:
    """``config.json`` and ``model.safetensors`` into ``out_dir``, each file replaced atomically."""
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".save-") as tmp:
        model.save_pretrained(tmp)
        for name in ("config.json", "model.safetensors"):
            os.replace(Path(tmp) / name, out_dir / name)


def train_compressor(
    labels: str | os.PathLike | Sequence[LabelRecord],
    out_dir: str | os.PathLike,
    *,
    epochs: int = 100,
    batch_size: int = 128,
    lr: float = 1e-3,
    channels: Sequence[int] = DEPTH_CHANNELS[5],
    kernel_size: int = 5,
    val_fraction: float = 0.1,
    seed: int = 0,
    base_model_type: str | None = None,
    base_model_name: str | None = None,
    resume: bool = False,
    accelerator: Accelerator | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a compressor on labels and save the best epoch (lowest validation KL) as a compressor directory.

    Args:
        labels: a label directory (or its ``index.json``) written by :class:`~hf_tokenprune.training.LabelWriter`,
            or the records themselves. Per-head labels (header ``feature`` ``"first_layer_head_attention"``) train a
            compressor of that feature; other ``[K, N_v]`` features (K > 1) a ``"layer_attention"`` one with ``K``
            input channels (multi-layer ablation).
        out_dir: the compressor directory to write (created).
        channels: channels of the depthwise-separable layers, see :data:`DEPTH_CHANNELS`.
        val_fraction: share of samples in the validation split, chosen by a hash of the sample id.
        seed: seeds the initial weights and the per-epoch shuffling; same seed, same data -> same weights.
        base_model_type, base_model_name: written into the compressor's config; default to the label header's
            ``model_type`` / ``model_name`` (or ``name_or_path``).
        resume: continue from ``out_dir``'s checkpoint (starts afresh when there is none). Without it an existing
            checkpoint is refused rather than overwritten.
        accelerator: an ``accelerate.Accelerator``; a default one when None (works without ``accelerate launch``;
            on a machine without GPU, launched processes train together on CPU).
        progress: show a tqdm bar over the epochs (main process only).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    records, summary = load_records(labels)
    header = summary["header"]
    base_model_type = base_model_type or header.get("model_type")
    base_model_name = base_model_name or header.get("model_name") or header.get("name_or_path")
    train = [r for r in records if not is_validation(r.sample_id, val_fraction)]
    val = [r for r in records if is_validation(r.sample_id, val_fraction)]
    if not train or not val:
        raise ValueError(f"{len(records)} label records give {len(train)} training and {len(val)} validation "
                         f"samples at val_fraction={val_fraction}; both must be non-empty")
    feature, layers = record_feature(records, header)
    settings = {"channels": list(channels), "kernel_size": kernel_size, "feature": feature, "in_channels": layers,
                "batch_size": batch_size, "lr": lr, "val_fraction": val_fraction, "seed": seed,
                "base_model_type": base_model_type, "base_model_name": base_model_name,
                "data": {"train": len(train), "val": len(val), "ids": _fingerprint([r.sample_id for r in records])}}

    out_dir = Path(out_dir)
    checkpoint = out_dir / CHECKPOINT
    if checkpoint.exists() and not resume:
        raise FileExistsError(f"{out_dir} already holds a training checkpoint; pass resume=True (`hf-tokenprune "
                              "train --resume`) to continue it or choose another output directory")
    accelerator = accelerator or _default_accelerator()
    torch.manual_seed(seed)
    model = Compressor(channels=tuple(channels), kernel_size=kernel_size, base_model_type=base_model_type,
                       base_model_name=base_model_name, feature=feature, in_channels=layers)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    state = {"settings": settings, "epoch": 0, "history": [], "best_epoch": 0, "best_kl": math.inf}
    if resume and checkpoint.exists():
        state = _load_checkpoint(checkpoint, model, optimizer)
        changed = [k for k in _RESUME_KEYS if state["settings"][k] != settings[k]]
        if changed:
            raise ValueError(f"cannot resume {out_dir}: {', '.join(changed)} differ from the checkpoint's "
                             f"({ {k: state['settings'][k] for k in changed} })")
    sampler = EpochShuffle(len(train), seed)
    train_loader = DataLoader(LabelDataset(train), batch_size=batch_size, sampler=sampler, collate_fn=collate)
    val_loader = DataLoader(LabelDataset(val), batch_size=batch_size, collate_fn=collate)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    unwrapped = accelerator.unwrap_model(model)
    baseline = evaluate_scores(attention_scores(feature), val_loader, accelerator.gather_for_metrics)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)

    bar = tqdm(range(state["epoch"], epochs), initial=state["epoch"], total=epochs, unit="epoch",
               disable=not (progress and accelerator.is_main_process), desc="train compressor")
    for epoch in bar:
        train_loader.set_epoch(epoch)
        model.train()
        total = torch.zeros(2, device=accelerator.device)
        for batch in train_loader:
            kl = kl_divergence(batch["target"], log_q(model(batch["features"], batch["mask"]).float(),
                                                      batch["mask"]), batch["mask"])
            optimizer.zero_grad()
            accelerator.backward(kl.mean())
            optimizer.step()
            total += torch.stack([kl.detach().sum(), torch.tensor(float(len(kl)), device=kl.device)])
        model.eval()
        total = accelerator.reduce(total, reduction="sum")
        metrics = {"epoch": epoch + 1, "train_kl": (total[0] / total[1]).item(),
                   **evaluate_scores(compressor_scores(model), val_loader, accelerator.gather_for_metrics)}
        state["history"].append(metrics)
        state["epoch"] = epoch + 1
        improved = metrics["kl"] < state["best_kl"]  # metrics are gathered: every process agrees
        if improved:
            state["best_kl"], state["best_epoch"] = metrics["kl"], epoch + 1
        if accelerator.is_main_process:
            if improved:
                _save_compressor(unwrapped, out_dir)
            _save_checkpoint(checkpoint, unwrapped, optimizer, state)
            (out_dir / "training_log.json").write_text(json.dumps(
                {"settings": settings, "baseline_attention": baseline, "history": state["history"]}, indent=1))
        bar.set_postfix(val_kl=f"{metrics['kl']:.4f}", best=state["best_epoch"])
        accelerator.wait_for_everyone()

    best = next(m for m in state["history"] if m["epoch"] == state["best_epoch"])
    result = TrainResult(out_dir, state["best_epoch"], {m: best[m] for m in METRICS}, baseline, state["history"])
    if accelerator.is_main_process:
        (out_dir / "README.md").write_text(model_card(result, settings, summary, epochs))
    return result
