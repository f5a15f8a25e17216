"""A task-conditional visual QA world, the small VLMs trained on it, and their shipped weights.

``load(family)`` returns a shipped world model (``"qwen2_vl"`` or ``"llava_onevision"``) and its processor
through the ordinary ``from_pretrained(local_dir)``; ``compressor_path(family)`` is the compressor trained
for it with ``hf-tokenprune label`` / ``train``.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"


def model_path(family: str) -> Path:
    """Directory of the shipped ``family`` world model (``save_pretrained`` layout, processor included)."""
    path = ASSETS / family
    if not (path / "config.json").exists():
        shipped = sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").exists()) if ASSETS.exists() else []
        raise FileNotFoundError(f"no shipped world model {family!r} in {ASSETS}; shipped: {shipped}")
    return path


def compressor_path(family: str) -> Path:
    """Directory of the compressor trained for the shipped ``family`` world model."""
    path = ASSETS / f"{family}-compressor"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no shipped compressor for {family!r} in {ASSETS}")
    return path


def load(family: str = "qwen2_vl", path: str | Path | None = None):
    """``(model, processor)`` of the shipped ``family`` world model (or of the world model directory ``path``), in
    eval mode."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .. import tiny  # noqa: F401  (registers the torchvision-free processor classes with AutoProcessor)

    path = path or model_path(family)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    return model, AutoProcessor.from_pretrained(path)
