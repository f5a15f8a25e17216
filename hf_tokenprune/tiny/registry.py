"""The registry of tiny families: what :func:`build` builds and what the shared invariant tests run over."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from tokenizers import AddedToken
from transformers import GenerationConfig, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.processing_utils import ProcessorMixin

from .tokenizer import SPECIAL_TOKENS, WORDS, build_tokenizer, special_token_ids


@dataclass(frozen=True)
class TinyFamily:
    """A tiny model family: its real ``...ForConditionalGeneration`` class and how to build it small.

    ``config(config_class, num_hidden_layers, image_size)``: the tiny config, an instance of ``config_class``
    (``model_class.config_class``); ``processor(tokenizer, image_size)``: the real processor around the shared
    tokenizer. ``image_size`` is ``None`` for the family's default; where it matters both must get the same value.
    ``modalities``: the input kinds the model and processor take. ``tokens``: special tokens the family needs beyond
    the shared tokenizer's (Pixtral's ``[IMG]``, ``[IMG_BREAK]``, ``[IMG_END]``): :func:`build_processor` appends them
    to the vocabulary (ids :func:`added_token_ids`), :func:`build_model` never generates them, and the family's config
    sizes its vocabulary for them. ``randomize``: weights the architecture initialises to zero (Gemma 3's image
    projection), drawn at random by :func:`build_model` so that random visual features differ. ``eager``: sub-configs
    whose models have no sdpa attention (Gemma 4's audio tower), built with eager attention whatever
    :func:`build_model` is asked for.
    """

    name: str
    model_class: type[PreTrainedModel]
    config: Callable[[type[PreTrainedConfig], int, int | None], PreTrainedConfig]
    processor: Callable[[PreTrainedTokenizerFast, int | None], ProcessorMixin]
    modalities: tuple[str, ...] = ("image", "video")
    tokens: tuple[str, ...] = ()
    randomize: tuple[str, ...] = ()
    eager: tuple[str, ...] = ()


_REGISTRY: dict[str, TinyFamily] = {}


def register_family(family: TinyFamily) -> None:
    """Add ``family`` to :data:`FAMILIES` (after the families registered before it)."""
    if family.name in _REGISTRY:
        raise ValueError(f"tiny family {family.name!r} is already registered")
    _REGISTRY[family.name] = family


def get_family(name: str) -> TinyFamily:
    """The registered family ``name``; ``ValueError`` for an unknown name."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown family {name!r}; expected one of {tuple(_REGISTRY)}")
    return _REGISTRY[name]


class _Names(Sequence[str]):
    """The registered family names in registration order, live; equal to the tuple of them."""

    def __getitem__(self, index):
        return tuple(_REGISTRY)[index]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __eq__(self, other: object) -> bool:
        return tuple(self) == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(tuple(self))


class _Modalities(Mapping[str, tuple[str, ...]]):
    """Family name -> the input kinds it takes, live."""

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return _REGISTRY[name].modalities

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_REGISTRY))

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return repr(dict(self))


FAMILIES: Sequence[str] = _Names()
MODALITIES: Mapping[str, tuple[str, ...]] = _Modalities()


def added_token_ids(tokens: Sequence[str]) -> dict[str, int]:
    """Token -> id of a family's :attr:`TinyFamily.tokens`: appended after the shared vocabulary, in order."""
    return {token: len(SPECIAL_TOKENS) + len(WORDS) + i for i, token in enumerate(tokens)}


def build_processor(family: str, *, image_size: int | None = None) -> ProcessorMixin:
    """The family's real transformers processor (PIL image processor) around :func:`build_tokenizer` with the
    family's :attr:`TinyFamily.tokens`; for ``image_size`` see the family's module."""
    spec = get_family(family)
    tokenizer = build_tokenizer()
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in spec.tokens], special_tokens=True)
    return spec.processor(tokenizer, image_size)


def build_model(
    family: str,
    *,
    seed: int = 0,
    num_hidden_layers: int = 2,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    image_size: int | None = None,
) -> PreTrainedModel:
    """Tiny random-weight model of the real architecture, deterministic for ``seed``, in ``.eval()`` mode.

    ``image_size`` must match :func:`build_processor` (see the family's module). The global torch RNG state is left
    untouched.
    """
    spec = get_family(family)
    config = spec.config(spec.model_class.config_class, num_hidden_layers, image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attention = {"": attn_implementation, **dict.fromkeys(config.sub_configs, attn_implementation),
                     **dict.fromkeys(spec.eager, "eager")} if spec.eager else attn_implementation
        model = spec.model_class._from_config(config, attn_implementation=attention, dtype=dtype)
        with torch.no_grad():
            for name in spec.randomize:
                model.get_parameter(name).normal_(std=config.get_text_config().initializer_range)
    ids = special_token_ids()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["[PAD]"],
        do_sample=False,
        max_new_tokens=16,
        # a random model must never emit placeholders / padding (real models don't either)
        suppress_tokens=[ids[t] for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")]
        + list(added_token_ids(spec.tokens).values()),
    )
    return model.eval()


def build(family: str, **kw) -> tuple[PreTrainedModel, ProcessorMixin]:
    """``(build_model(family, **kw), build_processor(family, image_size=kw.get("image_size")))``."""
    processor = build_processor(family, image_size=kw.get("image_size"))
    model = build_model(family, **kw)
    return model, processor
