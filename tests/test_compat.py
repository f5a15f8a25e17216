"""The compatibility module matches the installed transformers, and the supported range is stated consistently."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import transformers
from packaging.requirements import Requirement
from packaging.version import Version

from hf_tokenprune import compat, tiny

ROOT = Path(__file__).resolve().parents[1]


def transformers_requirement() -> Requirement:
    """pyproject.toml's transformers requirement (a regex: tomllib is 3.11+ and the package supports 3.10)."""
    return Requirement(re.search(r'^\s*"(transformers[<>=,.\d]+)",$', (ROOT / "pyproject.toml").read_text(), re.M)[1])


def test_installed_transformers_is_in_the_supported_range():
    assert Version(transformers.__version__) in transformers_requirement().specifier


def test_ci_tests_the_lower_bound_and_readme_states_it():
    lower = next(s.version for s in transformers_requirement().specifier if s.operator == ">=")
    oldest = re.search(r"^OLDEST=(\S+)$", (ROOT / ".ci" / "run").read_text(), re.M).group(1)
    assert Version(oldest) == Version(lower)
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"Supported transformers: `>=" + re.escape(lower) + r",<6`", readme)
    assert f"({oldest})" in readme


def test_cache_names_fit_the_installed_release():
    """A model call given its cache through ``with_cache`` extends it, and ``output_cache`` finds it in the output."""
    model, processor = tiny.build("llava")
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        first = model(input_ids=ids, use_cache=True)
        cache = compat.output_cache(first)
        assert cache is not None and cache.get_seq_length() == 4
        second = model(input_ids=ids[:, :1], use_cache=True, **compat.with_cache(cache))
    assert compat.output_cache(second).get_seq_length() == 5
    assert compat.cache_kwarg(compat.with_cache(cache)) is cache
    assert compat.generate_cache({"past_key_values": cache}) is cache


def test_versions_names_both_libraries():
    assert compat.versions() == f"transformers {transformers.__version__}, torch {torch.__version__}"
