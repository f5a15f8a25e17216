"""TokenPruneConfig: what to prune, how many tokens to keep, and how to number what is kept."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

POSITIONS = ("original", "contiguous")
SCOPES = ("sample", "image")
SCORER_NAMES = ("compressor", "attention", "random", "uniform", "divprune", "cdpruner", "compressor+dpp", "fastv",
                "pdrop", "dart", "tome", "visionzip")
COMPRESSOR_SCORERS = ("compressor", "compressor+dpp")  # built-in scorers that run a trained compressor
LAYER_SCORERS = ("fastv", "pdrop", "dart")  # baselines that prune inside the LLM (original positions only)
BUDGETS = ("fixed", "auto")
# built-in scorers whose scores are a relevance distribution
MASS_SCORERS = ("compressor", "attention", "cdpruner", "compressor+dpp")
DEFAULT_LAYER = 2  # FastV's and DART's default pruning layer K
# what scorer=None prunes with when the model has no compressor: the best training-free method measured on the toy
# world models (docs/results.md#the-default-without-a-compressor); with budget="auto" the best one of MASS_SCORERS
FALLBACK_SCORER = "divprune"
AUTO_FALLBACK_SCORER = "attention"


def check_fraction(name: str, value: Any, *, zero: bool = False) -> float:
    """``value`` as a float in ``(0, 1]`` (``[0, 1]`` with ``zero=True``); TypeError / ValueError naming ``name``."""
    interval = "[0, 1]" if zero else "(0, 1]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in {interval}, got {type(value).__name__} {value!r}")
    if math.isnan(value) or not (0.0 <= value <= 1.0) or (value == 0.0 and not zero):
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


@dataclass
class TokenPruneConfig:
    """Configuration of visual-token pruning: at the LLM input, or inside it for the ``fastv`` / ``pdrop`` / ``dart``
    baselines.

    Args:
        ratio: fraction of visual tokens KEPT, in (0, 1], with ``budget="fixed"``. ``1.0`` disables pruning: no
            scorer is built, so no compressor is needed.
        scorer: None (default), a built-in scorer name or a :class:`~hf_tokenprune.scorers.Scorer` instance. None: the
            model's compressor (``compressor=``, which must load, else the model's default Hub repo) if one is found,
            else the training-free :data:`FALLBACK_SCORER` (:data:`AUTO_FALLBACK_SCORER` with ``budget="auto"``) with a
            :class:`~hf_tokenprune.methods.NoCompressorWarning`, once per model; ``PruneStats.scorer`` says which ran.
            Input stage: ``"compressor"`` (the paper's method; raises :class:`~hf_tokenprune.CompressorNotFoundError`
            when none is found), ``"attention"``, ``"random"``, ``"uniform"``, ``"tome"`` (token merging),
            ``"visionzip"`` (dominant tokens by vision-tower attention plus merged contextual ones), and the set
            selections ``"divprune"`` (max-min diversity), ``"cdpruner"`` (conditional DPP on instruction relevance) and
            ``"compressor+dpp"`` (that DPP on the compressor's relevance). Inside the LLM
            (:mod:`hf_tokenprune.baselines`): ``"fastv"``, ``"pdrop"``, ``"dart"``.
        compressor: the trained compressor for ``scorer=None`` / ``"compressor"`` / ``"compressor+dpp"``: a Hub repo id,
            a local directory or a :class:`~hf_tokenprune.Compressor`; None looks up the model's conventional Hub repo
            (:func:`hf_tokenprune.hub.default_compressor_repo`).
        positions: ``"original"`` keeps each kept token's original position ids (default, matches the
            unpruned model with the dropped tokens masked out); ``"contiguous"`` numbers the shortened
            sequence 0, 1, 2, ... as if it had never been longer.
        min_tokens: lower bound on the tokens kept per budget unit (sample or image/frame).
        scope: ``"sample"`` ranks all visual tokens of a sample together (default); ``"image"`` gives every
            image (or video frame) its own ``ratio`` budget.
        seed: seed of the ``"random"`` scorer.
        allow_compressor_mismatch: accept a compressor trained for another model family.
        layer: the LLM layer K before which ``"fastv"`` and ``"dart"`` prune (None: 2, their papers' default;
            0 prunes at the input). ``"pdrop"`` derives its stages from the model depth and ``ratio``.
        budget: ``"fixed"`` (default): every budget unit keeps ``ratio`` of its tokens. ``"auto"``: every unit keeps
            the smallest set of its highest-scored tokens whose share of the unit's relevance distribution reaches
            ``mass``, clamped to ``[min_ratio, max_ratio]`` of its tokens (and ``min_tokens``), so samples of one
            batch keep different counts. The distribution is the scorer's :attr:`~hf_tokenprune.Scorer.distribution`
            of its scores: the softmax of the compressor's logits (``"compressor"``, ``"compressor+dpp"``), the
            normalised ``A^0_v`` for ``"attention"``, the instruction relevance for ``"cdpruner"``; ``"random"``,
            ``"uniform"``, ``"divprune"``, ``"tome"``, ``"visionzip"`` and the in-LLM baselines have none and are
            refused.
        mass: the relevance-mass threshold of ``budget="auto"``, in (0, 1]. None: the calibrated threshold saved
            in the compressor's config (:func:`hf_tokenprune.calibrate`, ``hf-tokenprune calibrate``).
        min_ratio, max_ratio: the clamp of ``budget="auto"`` (fractions of each unit's tokens). None: the
            calibration's values with a calibrated threshold, else 0 and 1.
        temperature: of the ``budget="auto"`` distribution, > 0: ``softmax(scores / temperature)`` (``"sum"``
            scorers: ``scores ** (1 / temperature)``, normalised). Below 1 the distribution sharpens, so a unit
            whose relevance sits on one token keeps fewer tokens and one whose relevance is spread over many
            keeps more, at the same mean retention; towards infinity the rule becomes a fixed ratio. The ranking
            never changes. None: the calibration's value with a calibrated threshold, else 1.
    """

    ratio: float = 0.25
    scorer: Any = None
    compressor: Any = None
    positions: str = "original"
    min_tokens: int = 1
    scope: str = "sample"
    seed: int = 0
    allow_compressor_mismatch: bool = False
    layer: int | None = None
    budget: str = "fixed"
    mass: float | None = None
    min_ratio: float | None = None
    max_ratio: float | None = None
    temperature: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
            raise TypeError(f"ratio must be a number in (0, 1], got {type(self.ratio).__name__} {self.ratio!r}")
        if not (0.0 < float(self.ratio) <= 1.0) or math.isnan(self.ratio):
            raise ValueError(
                f"ratio is the fraction of visual tokens KEPT and must be in (0, 1], got {self.ratio!r}"
            )
        self.ratio = float(self.ratio)
        if self.scorer is None:
            pass
        elif isinstance(self.scorer, str):
            if self.scorer not in SCORER_NAMES:
                raise ValueError(f"unknown scorer {self.scorer!r}; built-in scorers are {', '.join(SCORER_NAMES)}"
                                 " (or pass a Scorer instance)")
        elif isinstance(self.scorer, type):
            raise TypeError(f"scorer must be a name or a scorer instance, got the class {self.scorer.__name__}; pass "
                            f"{self.scorer.__name__}()")
        elif not callable(getattr(self.scorer, "score", None)):
            raise TypeError(f"scorer must be a name or an object with a score() method, got {self.scorer!r}")
        if self.compressor is not None and not isinstance(self.compressor, str) and not callable(
            getattr(self.compressor, "relevance", None)
        ):
            raise TypeError(
                "compressor must be a Hub repo id, a local path or a Compressor, "
                f"got {type(self.compressor).__name__}"
            )
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an int >= 0, got {self.min_tokens!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.layer is not None:
            if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
                raise ValueError(f"layer must be an int >= 0 or None, got {self.layer!r}")
            if self.scorer not in ("fastv", "dart"):
                raise ValueError(f"layer applies to scorer='fastv' and 'dart' only, not {self.scorer_name!r} "
                                 "(pdrop derives its stages from the model depth)")
        if self.scorer in LAYER_SCORERS and self.positions != "original":
            raise ValueError(f"scorer={self.scorer!r} prunes inside the LLM, where kept tokens keep their original "
                             "positions: it needs positions='original'")
        self._check_budget()

    def _check_budget(self) -> None:
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        given = [name for name in ("mass", "min_ratio", "max_ratio", "temperature") if getattr(self, name) is not None]
        if self.budget == "fixed":
            if given:
                raise ValueError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to budget='auto' only; "
                                 "the fixed budget keeps `ratio` of every unit")
            return
        if isinstance(self.scorer, str) and self.scorer not in MASS_SCORERS:
            raise ValueError(f"budget='auto' keeps tokens by their share of a relevance distribution; scorer "
                             f"{self.scorer!r} gives none (use scorer={' or '.join(map(repr, MASS_SCORERS))}, a "
                             "Scorer with a `distribution`, or budget='fixed' with ratio=)")
        if self.mass is not None:
            self.mass = check_fraction("mass", self.mass)
        if self.min_ratio is not None:
            self.min_ratio = check_fraction("min_ratio", self.min_ratio, zero=True)
        if self.max_ratio is not None:
            self.max_ratio = check_fraction("max_ratio", self.max_ratio)
        if self.min_ratio is not None and self.max_ratio is not None and self.min_ratio > self.max_ratio:
            raise ValueError(f"min_ratio ({self.min_ratio}) must not exceed max_ratio ({self.max_ratio})")
        if self.temperature is not None:
            if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
                raise TypeError(f"temperature must be a number > 0, got {type(self.temperature).__name__} "
                                f"{self.temperature!r}")
            if not (0.0 < self.temperature < math.inf):
                raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
            self.temperature = float(self.temperature)

    @property
    def prunes(self) -> bool:
        """Whether this configuration drops tokens at all: ``budget="auto"``, or a ``ratio`` below 1."""
        return self.budget == "auto" or self.ratio < 1.0

    @property
    def scorer_name(self) -> str:
        """The built-in name, ``"default"`` for None (the compressor or the fallback), else the class name."""
        if self.scorer is None:
            return "default"
        return self.scorer if isinstance(self.scorer, str) else type(self.scorer).__name__

    @property
    def pruning_layer(self) -> int:
        """``layer`` with its default filled in (fastv, dart)."""
        return DEFAULT_LAYER if self.layer is None else self.layer

    def replace(self, **overrides: Any) -> TokenPruneConfig:
        """A copy with some fields changed (validated)."""
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown TokenPruneConfig field(s): {', '.join(sorted(unknown))}")
        return TokenPruneConfig(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict. A scorer object is recorded by its class name, a Compressor object as None."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["scorer"] = None if self.scorer is None else self.scorer_name
        if self.compressor is not None and not isinstance(self.compressor, str):
            out["compressor"] = None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenPruneConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown TokenPruneConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**data)
