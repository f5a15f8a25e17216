"""Gemma 3: SigLIP tower average-pooled to a fixed token grid, Gemma 3 text model with sliding-window and global
layers (``language_model``).

Every image (and, with ``do_pan_and_scan=True`` in the processor call, every pan-and-scan crop after it) is resized
to the tower's input size and gives ``GEMMA3_IMAGE_TOKENS`` ``<image_soft_token>`` placeholders, written
``\\n\\n<start_of_image>`` + placeholders + ``<end_of_image>\\n\\n``; ``token_type_ids`` marks them, and the image
tokens of one run attend to each other bidirectionally in every layer. The real checkpoints: 896 px, 256 tokens,
a 1024-token sliding window in five of every six layers.

The tiny sizes: 32 px images, patch 4 (8 x 8 patches pooled 2 x 2 -> 16 tokens), two layers (sliding, then global)
with a sliding window of ``GEMMA3_SLIDING_WINDOW`` tokens (tests narrow it to make it cut).
"""

from __future__ import annotations

from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, PreTrainedTokenizerFast
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from .processors import TorchFreeProcessorMixin, per_prompt, register_processor
from .registry import TinyFamily, added_token_ids
from .sizes import TEXT_HEAD_DIM, VISION_HEADS, VISION_HIDDEN_SIZE, text_kwargs
from .tokenizer import rebuilt_tokenizer

GEMMA3_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
GEMMA3_IMAGE_SIZE = 32
GEMMA3_IMAGE_TOKENS = 16
GEMMA3_SLIDING_WINDOW = 512

# Gemma 3's chat template (each image a <start_of_image> for the processor to expand) with the shared tokenizer's
# turn tokens and role words (Gemma: <start_of_turn>user / model ... <end_of_turn>)
GEMMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TinyGemma3Processor(TorchFreeProcessorMixin, Gemma3Processor):
    """Stock :class:`~transformers.Gemma3Processor` that reloads its image processor as the PIL class; it also takes
    the images of a batch as one flat list, split over the prompts by their ``<start_of_image>`` counts (the stock
    one wants a list per prompt)."""

    def prepare_inputs_layout(self, images=None, text=None, **kwargs):
        return super().prepare_inputs_layout(images=per_prompt(images, text, self.image_token), text=text, **kwargs)


register_processor(TinyGemma3Processor, Gemma3ImageProcessorPil)


def gemma3_tokenizer(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """``tokenizer`` (with :data:`GEMMA3_TOKENS` added) naming the tokens ``Gemma3Processor`` reads."""
    return rebuilt_tokenizer(tokenizer, extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})


def _config(config_class: type[Gemma3Config], num_hidden_layers: int, image_size: int | None) -> Gemma3Config:
    if image_size not in (None, GEMMA3_IMAGE_SIZE):
        raise ValueError(f"the tiny Gemma 3 image size is fixed at {GEMMA3_IMAGE_SIZE}")
    ids = added_token_ids(GEMMA3_TOKENS)
    text = text_kwargs(num_hidden_layers)
    text.update(model_type="gemma3_text", vocab_size=text["vocab_size"] + len(GEMMA3_TOKENS), head_dim=TEXT_HEAD_DIM,
                query_pre_attn_scalar=TEXT_HEAD_DIM, sliding_window=GEMMA3_SLIDING_WINDOW,
                layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_hidden_layers)])
    vision = dict(model_type="siglip_vision_model", hidden_size=VISION_HIDDEN_SIZE,
                  intermediate_size=2 * VISION_HIDDEN_SIZE, num_hidden_layers=2, num_attention_heads=VISION_HEADS,
                  image_size=GEMMA3_IMAGE_SIZE, patch_size=4, vision_use_head=False)
    return config_class(text_config=text, vision_config=vision, mm_tokens_per_image=GEMMA3_IMAGE_TOKENS,
                        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                        image_token_index=ids["<image_soft_token>"], tie_word_embeddings=False)


def _processor(tokenizer: PreTrainedTokenizerFast, image_size: int | None) -> TinyGemma3Processor:
    image_processor = Gemma3ImageProcessorPil(size={"height": GEMMA3_IMAGE_SIZE, "width": GEMMA3_IMAGE_SIZE})
    return TinyGemma3Processor(image_processor=image_processor, tokenizer=gemma3_tokenizer(tokenizer),
                               image_seq_length=GEMMA3_IMAGE_TOKENS, chat_template=GEMMA3_CHAT_TEMPLATE)


GEMMA3 = TinyFamily("gemma3", Gemma3ForConditionalGeneration, _config, _processor, modalities=("image",),
                    tokens=GEMMA3_TOKENS, randomize=("model.multi_modal_projector.mm_input_projection_weight",))
