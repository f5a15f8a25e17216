"""What the Pixtral-style tiny families (:mod:`.mistral3`, :mod:`.llava_pixtral`) share: the stock
:class:`~transformers.models.pixtral.processing_pixtral.PixtralProcessor`, its image tokens, a tiny Pixtral tower and
a Mistral text model (:func:`pixtral_family`).

An image is resized (longest edge at most ``PIXTRAL_MAX_IMAGE_SIZE``, each side rounded up to a multiple of the
token's pixel size) and gives one ``[IMG]`` per token, row by row, each row followed by ``[IMG_BREAK]`` and the last
one by ``[IMG_END]`` instead.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.models.pixtral import image_processing_pil_pixtral
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

from .processors import TorchFreeProcessorMixin, import_without_torchvision, register_processor
from .registry import TinyFamily, added_token_ids
from .sizes import VISION_HEADS, VISION_HIDDEN_SIZE, text_kwargs
from .tokenizer import LLAVA_CHAT_TEMPLATE

PIXTRAL_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")
PIXTRAL_MAX_IMAGE_SIZE = 112  # the tower's image_size: the longest edge an image is resized to (at most)
# The LLaVA-1.5 template (images only) with Pixtral's image token.
PIXTRAL_CHAT_TEMPLATE = LLAVA_CHAT_TEMPLATE.replace("'<image>'", "'[IMG]'")


class TinyPixtralProcessor(TorchFreeProcessorMixin, import_without_torchvision(
        "transformers.models.pixtral.processing_pixtral", "PixtralProcessor",
        "transformers.models.pixtral.image_processing_pixtral", image_processing_pil_pixtral)):
    """Stock ``PixtralProcessor`` that reloads its image processor as the PIL class."""


register_processor(TinyPixtralProcessor, PixtralImageProcessorPil)


def pixtral_family(name: str, model_class: type[PreTrainedModel], patch_size: int, merge: int,
                   **config: Any) -> TinyFamily:
    """An images-only Pixtral-style family: a Mistral text model (its vocabulary grown by :data:`PIXTRAL_TOKENS`), a
    tiny Pixtral tower of ``patch_size`` whose ``merge``^2 patches make one token, full features of the last layer,
    and the stock processor; ``config``: the model config's own further fields."""

    def make_config(config_class: type[PreTrainedConfig], num_hidden_layers: int,
                    image_size: int | None) -> PreTrainedConfig:
        text = text_kwargs(num_hidden_layers)
        text.update(model_type="mistral", sliding_window=None, vocab_size=text["vocab_size"] + len(PIXTRAL_TOKENS),
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        vision = dict(model_type="pixtral", hidden_size=VISION_HIDDEN_SIZE, intermediate_size=2 * VISION_HIDDEN_SIZE,
                      num_hidden_layers=2, num_attention_heads=VISION_HEADS, image_size=PIXTRAL_MAX_IMAGE_SIZE,
                      patch_size=patch_size, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        return config_class(text_config=text, vision_config=vision,
                            image_token_index=added_token_ids(PIXTRAL_TOKENS)["[IMG]"], vision_feature_layer=-1,
                            tie_word_embeddings=False, **config)

    def make_processor(tokenizer: PreTrainedTokenizerFast, image_size: int | None) -> TinyPixtralProcessor:
        """The image processor's own ``patch_size`` is a token's pixel size, as the processor passes it, so that it
        gives the same image sizes called alone (Mistral-Small-3.1's is the tower's patch size: called alone, as for
        the visual inputs of a next chat turn, it needs ``patch_size=patch_size * spatial_merge_size``)."""
        token = patch_size * merge
        image_processor = PixtralImageProcessorPil(size={"longest_edge": PIXTRAL_MAX_IMAGE_SIZE},
                                                   patch_size={"height": token, "width": token})
        return TinyPixtralProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                    spatial_merge_size=merge, chat_template=PIXTRAL_CHAT_TEMPLATE)

    return TinyFamily(name, model_class, make_config, make_processor, modalities=("image",), tokens=PIXTRAL_TOKENS)
