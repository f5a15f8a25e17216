"""LLaVA-1.5 (``LlavaForConditionalGeneration``): fixed-size images, no video, 1-D positions.

Every image is resized and cropped to the vision tower's input size, so each gives the same number of
``<image>`` placeholders (CLIP ViT-L/14-336: 576 patch features, the CLS token dropped by
``vision_feature_select_strategy="default"``). Items come from ``mm_encoder_outputs`` under ``generate`` (a list
with one tensor per image); on a plain forward the ``[images, C, H, W]`` ``pixel_values`` give equal counts
whose sum transformers has already checked against the placeholders. Adjacent images (``<image><image>``) are
split by these counts. Token geometry: the patch grid of the center crop, mapped back through the resize.
Checkpoints of this model type with a Pixtral tower are served by :class:`~.pixtral.LlavaPixtralAdapter`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .base import Adapter, Placeholder, PlaceholderAdapter, UnsupportedMethodError
from .pixtral import LlavaPixtralAdapter
from .regions import ItemRegions, clip_boxes, grid_boxes, nan_boxes, spans
from .vision_attention import argument, cls_attention


class LlavaAdapter(PlaceholderAdapter):
    model_types = ("llava",)

    @classmethod
    def for_model(cls, model: nn.Module) -> type[Adapter]:
        """A checkpoint with a Pixtral tower (pixtral-12b) is served by :class:`~.pixtral.LlavaPixtralAdapter`."""
        if cls is LlavaAdapter and model.config.vision_config.model_type == "pixtral":
            return LlavaPixtralAdapter
        return cls

    def vision_attention_layer(self) -> nn.Module:
        """The CLIP (or DINOv2) layer whose output the projector receives (``vision_feature_layer``:
        ``hidden_states[j]`` is the output of layer ``j - 1``, ``hidden_states[-j]`` of layer ``-j``; LLaVA-1.5's
        -2, as VisionZip)."""
        cfg = self.model.config
        layer = cfg.vision_feature_layer
        towers = {"clip_vision_model": "layers", "dinov2": "layer"}  # the encoder's list of layers
        if cfg.vision_config.model_type not in towers:
            raise UnsupportedMethodError(f"scorer='visionzip' ranks LLaVA tokens by the CLS attention of a CLIP or "
                                         f"DINOv2 tower; this one is {cfg.vision_config.model_type!r}")
        if not isinstance(layer, int) or layer == 0 or cfg.vision_feature_select_strategy != "default":
            raise UnsupportedMethodError(
                "scorer='visionzip' needs one feature layer and the CLS dropped (vision_feature_layer an int "
                f"other than 0, vision_feature_select_strategy='default'); got {layer!r}, "
                f"{cfg.vision_feature_select_strategy!r}")
        layers = getattr(self.multimodal_model.vision_tower.encoder, towers[cfg.vision_config.model_type])
        return layers[layer - 1 if layer > 0 else layer]

    def vision_attention(self, records: Sequence[tuple[tuple, dict]], call: Mapping[str, Any]) -> torch.Tensor:
        """The CLS query's attention to each patch (one LLM token per patch), averaged over heads."""
        layer = self.vision_attention_layer()
        values = [cls_attention(layer, argument(args, kwargs, "hidden_states", 0)).flatten()
                  for args, kwargs in records]
        return self.scatter_items(call, torch.cat(values))

    def input_item_lengths(self, call: Mapping[str, Any], placeholder: Placeholder) -> list[int] | None:
        pixels = call.get(placeholder.pixels)
        if pixels is None or call.get("image_sizes") is not None:
            return None
        images = int(pixels.shape[0])
        return [int((call["input_ids"] == placeholder.token_id).sum()) // images] * images

    def item_regions(self, inputs: Mapping[str, Any], kind: str, index: int,
                     original_size: tuple[int, int] | None) -> ItemRegions:
        """CLIP preprocessing: resize the shortest edge to the tower's input size ``S`` (the side of
        ``pixel_values``: a DINOv2 tower runs at any multiple of its patch), center-crop ``S x S`` (the LLaVA-1.5
        processors: ``size={"shortest_edge": S}``, ``crop_size=S``). Needs ``original_size``."""
        if original_size is None:
            raise ValueError("LLaVA-1.5 token geometry needs the original image sizes (the processor output does "
                             "not carry them): pass original_sizes=[image.size for image in images]")
        if index >= inputs["pixel_values"].shape[0]:
            raise IndexError(index)
        crop, patch = int(inputs["pixel_values"].shape[-1]), self.model.config.vision_config.patch_size
        width, height = original_size
        # transformers' get_resize_output_image_size(default_to_square=False) and center_crop
        short, long = sorted((width, height))
        new_w, new_h = (crop, int(crop * long / short)) if width <= height else (int(crop * long / short), crop)
        left, top = (new_w - crop) // 2, (new_h - crop) // 2
        side = crop // patch
        edges = torch.arange(side + 1, dtype=torch.float64) * patch
        cells = clip_boxes(grid_boxes(spans((top + edges) / new_h), spans((left + edges) / new_w)))
        if self.model.config.vision_feature_select_strategy == "full":  # the CLS token comes first
            cells = torch.cat([nan_boxes(1), cells])
        return ItemRegions.of(cells)
