"""Every name that differs between the supported transformers releases, in one place.

Supported: transformers 5.20 up to the newest 5.x (CI runs the oldest and the newest). Names are detected from
the installed release's signatures, not from its version number, so a backport or a patch release that renames
nothing needs no change here.

* The KV cache: a keyword of model, text-model and ``generate`` calls and a field of their outputs, called
  ``past_key_values`` up to transformers 5.23 and ``cache`` from 5.24 on (the old name then only warns).
* M-RoPE numbering of a continued turn: from 5.23 on, Qwen-style ``generate`` recomputes the 3-D positions when
  the uncached part of a conversation holds vision tokens; before, it reuses the previous call's ``rope_deltas``
  and numbers them wrong (the unpruned model too), so the adapters refuse those continuations there.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers.masking_utils import create_causal_mask

TRANSFORMERS_VERSION: str = transformers.__version__

#: whether ``generate`` renumbers the M-RoPE positions of a continued turn that brings vision tokens
MROPE_RENUMBERS_CONTINUED_TURNS: bool = Version(TRANSFORMERS_VERSION).release >= (5, 23)

#: whether LLaVA-NeXT-Video's ``get_video_features`` gives each video as ``[frames, tokens, hidden]`` (5.20.0; one
#: ``[frames * tokens, hidden]`` row from 5.20.1 on), which ``generate`` then splits wrongly when it repeats the
#: features for beam search or several return sequences (unpruned too)
VIDEO_FEATURES_PER_FRAME: bool = Version(TRANSFORMERS_VERSION).release < (5, 20, 1)

#: the keyword (and output field) of the KV cache in this transformers release
CACHE: str = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def cache_kwarg(kwargs: dict[str, Any]) -> Any:
    """The KV cache in the keyword arguments of a model, text-model or mask-function call (None if absent)."""
    return kwargs.get(CACHE)


def output_cache(output: Any) -> Any:
    """The KV cache a model or ``generate`` output returned (None if it returned none)."""
    return getattr(output, CACHE, None)


def with_cache(cache: Any) -> dict[str, Any]:
    """Keyword arguments passing ``cache`` to a model, text-model, mask-function or ``generate`` call."""
    return {CACHE: cache}


def versions() -> str:
    """``transformers X, torch Y``: what a run was made with."""
    return f"transformers {TRANSFORMERS_VERSION}, torch {torch.__version__}"


def generate_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a user passed to ``generate``: 5.24+ takes ``cache=`` and still accepts ``past_key_values=``."""
    return kwargs.get(CACHE, kwargs.get("past_key_values"))
