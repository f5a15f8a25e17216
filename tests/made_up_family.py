"""A made-up model family, registered for the tests: LLaVA-1.5 under another ``model_type``.

Registering it with the adapter registry and the tiny-family registry is all it takes for the shared invariant
matrix (``test_invariants.py``) to run on it; the other test modules, with their per-family expectations, run over
the shipped families (``conftest.FAMILIES``).
"""

from __future__ import annotations

import dataclasses

from transformers import AutoConfig, AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration

from hf_tokenprune import tiny
from hf_tokenprune.adapters import register_adapter
from hf_tokenprune.adapters.llava import LlavaAdapter

NAME = "tokenprune_test_llava"


class MadeUpLlavaConfig(LlavaConfig):
    model_type = NAME


class MadeUpLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = MadeUpLlavaConfig


# As transformers would know a new family: its config and model class behind the Auto classes.
AutoConfig.register(NAME, MadeUpLlavaConfig)
AutoModelForImageTextToText.register(MadeUpLlavaConfig, MadeUpLlavaForConditionalGeneration)
# The two registrations that make it a tiny family hf_tokenprune prunes: its adapter and its tiny builder (LLaVA-1.5's).
register_adapter(NAME, LlavaAdapter)
tiny.register_family(dataclasses.replace(tiny.get_family("llava"), name=NAME,
                                         model_class=MadeUpLlavaForConditionalGeneration))

# The families the tests register (not shipped by hf_tokenprune.tiny).
FAMILIES = (NAME,)
