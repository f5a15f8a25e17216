"""The offline word-level tokenizer every tiny family shares, its fixed special-token ids and the chat templates."""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .images import COLOURS, SHAPES

# Fixed, documented ids: position in this tuple == token id.
SPECIAL_TOKENS = (
    "[PAD]",  # 0  pad
    "[UNK]",  # 1  unk
    "<|endoftext|>",  # 2  bos (Qwen style, never added automatically) and secondary eos
    "<|im_start|>",  # 3
    "<|im_end|>",  # 4  eos
    "<|vision_start|>",  # 5  Qwen vision_start_token_id
    "<|vision_end|>",  # 6  Qwen vision_end_token_id
    "<|image_pad|>",  # 7  Qwen image_token_id
    "<|video_pad|>",  # 8  Qwen video_token_id
    "<image>",  # 9  LLaVA-OneVision / LLaVA-1.5 image_token_index
    "<video>",  # 10 LLaVA-OneVision video_token_index
)

WORDS: tuple[str, ...] = tuple(dict.fromkeys([
    *COLOURS, "grey", "colour", "color", "colours", "colors", *SHAPES, "shape", "shapes",
    # question words / function words
    "what", "which", "where", "who", "how", "why", "when", "is", "are", "was", "the", "a", "an", "of", "in", "on",
    "at", "to", "and", "or", "not", "no", "yes", "it", "its", "this", "that", "there", "these", "those", "with",
    "without", "only", "also", "both", "each", "every", "all", "some", "any", "more", "less", "most", "least",
    "same", "different", "than", "as", "for", "from", "by", "be",
    # spatial
    "left", "right", "top", "bottom", "middle", "center", "centre", "above", "below", "next", "beside", "between",
    "near", "far", "side", "corner", "edge", "inside", "outside", "behind", "front", "back", "up", "down", "over",
    "under", "background", "foreground",
    # sizes / counting
    "big", "small", "large", "tiny", "many", "much", "count", "number", "size", "first", "second", "third", "last",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    *[str(d) for d in range(10)], "x",
    # media
    "image", "images", "picture", "photo", "video", "frame", "frames", "object", "objects", "thing", "things",
    # verbs
    "see", "show", "shows", "describe", "tell", "me", "you", "i", "can", "do", "does", "has", "have", "contains",
    "contain", "look", "looks", "move", "moves", "moving", "answer", "question", "please", "thanks", "hello",
    # chat roles / system prompt
    "system", "user", "assistant", "helpful",
    # punctuation (the pre-tokenizer isolates every punctuation character)
    "?", ".", ",", "!", ":", ";", "'", '"', "(", ")", "-", "/",
    # the toy VQA world (hf_tokenprune.world): appended, so earlier ids never change
    "diamond", "is", "the", "of", "left", "right", "above", "below", "object", "objects", "frame", "shows", "one",
    "two", "three", "four", "small", "large", "many", "are", "there", "all", "yes", "no", "in", *"0123456789",
]))

# Mirrors the chat template shipped with Qwen/Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Mirrors the chat template shipped with llava-hf/llava-onevision-qwen2-*-hf (images first, then videos, then
# text), plus plain-string content support.
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\n' + message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# LLaVA-1.5 (images only): the LLaVA-OneVision template without the video items.  The real llava-1.5-hf
# template is "USER: <image>\n... ASSISTANT:"; the <|im_start|>/<|im_end|> turns keep the shared tokenizer's eos
# as the end-of-turn token, like the other families.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\n' + message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer (lower-cased; whitespace/punctuation/digit split) with both families' specials.

    Token ids are fixed: ``SPECIAL_TOKENS[i]`` has id ``i``, ``WORDS[j]`` has id ``len(SPECIAL_TOKENS) + j``.
    Decoding joins words with single spaces.
    """
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *WORDS))}
    assert len(vocab) == len(SPECIAL_TOKENS) + len(WORDS), "duplicate vocabulary entries"
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        eos_token="<|im_end|>",
        model_max_length=4096,
        padding_side="right",
        chat_template=QWEN_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def rebuilt_tokenizer(tokenizer: PreTrainedTokenizerFast, backend: Tokenizer | None = None,
                      **settings: Any) -> PreTrainedTokenizerFast:
    """A tokenizer with ``tokenizer``'s special tokens, length limit, padding side and chat template over ``backend``
    (default: ``tokenizer``'s own), ``settings`` (a chat template, named special tokens) on top."""
    return PreTrainedTokenizerFast(**{
        "tokenizer_object": backend or tokenizer.backend_tokenizer, "unk_token": tokenizer.unk_token,
        "pad_token": tokenizer.pad_token, "eos_token": tokenizer.eos_token,
        "model_max_length": tokenizer.model_max_length, "padding_side": tokenizer.padding_side,
        "chat_template": tokenizer.chat_template, "clean_up_tokenization_spaces": False, **settings})


def special_token_ids() -> dict[str, int]:
    """Token -> id for every special token of :func:`build_tokenizer`."""
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}


def text_token_ids() -> dict[str, int]:
    """``bos_token_id``/``eos_token_id``/``pad_token_id`` of a text config, for :func:`build_tokenizer`'s ids.

    Shared with :func:`hf_tokenprune.world.models.build_config`.
    """
    ids = special_token_ids()
    return dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["[PAD]"])
