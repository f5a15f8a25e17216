"""Mistral 3 (Mistral-Small-3.1 style): Pixtral vision tower, 2 x 2 patch merger, Mistral text model; images only.

Patches of 7 px merged 2 x 2: one ``[IMG]`` token per 14 x 14 px of the resized image (a 56 x 56 image: 4 rows of
4, each row followed by ``[IMG_BREAK]`` / ``[IMG_END]``); images of different sizes give different counts
(``image_sizes``). ``image_size`` is not used (the tower takes any size up to ``PIXTRAL_MAX_IMAGE_SIZE``).
"""

from __future__ import annotations

from transformers import Mistral3ForConditionalGeneration

from .pixtral import pixtral_family

MISTRAL3_PATCH_SIZE = 7
MISTRAL3_MERGE_SIZE = 2

MISTRAL3 = pixtral_family("mistral3", Mistral3ForConditionalGeneration, MISTRAL3_PATCH_SIZE, MISTRAL3_MERGE_SIZE,
                          spatial_merge_size=MISTRAL3_MERGE_SIZE)
