"""LLaVA with a Pixtral tower (pixtral-12b style, ``model_type="llava"``): no patch merger, Mistral text model.

Patches of 14 px: one ``[IMG]`` token per 14 x 14 px of the resized image, row by row with ``[IMG_BREAK]`` /
``[IMG_END]`` as for :mod:`.mistral3`; full features of the last layer (Pixtral has no CLS token).
``image_size`` is not used.
"""

from __future__ import annotations

from transformers import LlavaForConditionalGeneration

from .pixtral import pixtral_family

LLAVA_PIXTRAL_PATCH_SIZE = 14

LLAVA_PIXTRAL = pixtral_family("llava_pixtral", LlavaForConditionalGeneration, LLAVA_PIXTRAL_PATCH_SIZE, 1,
                               vision_feature_select_strategy="full")
