import pytest

from hf_tokenprune import AttentionScorer, TokenPruneConfig


@pytest.mark.parametrize("ratio", [0, -0.1, 1.0001, 2, float("nan")])
def test_ratio_out_of_range_is_refused(ratio):
    with pytest.raises(ValueError, match="ratio"):
        TokenPruneConfig(ratio=ratio)


def test_ratio_must_be_a_number():
    with pytest.raises(TypeError, match="ratio"):
        TokenPruneConfig(ratio="0.5")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("scorer", "fastest", "unknown scorer 'fastest'"),
        ("positions", "shifted", "positions must be one of"),
        ("scope", "frame", "scope must be one of"),
        ("min_tokens", -1, "min_tokens"),
        ("seed", 1.5, "seed"),
    ],
)
def test_invalid_fields_name_the_problem(field, value, message):
    with pytest.raises(ValueError, match=message):
        TokenPruneConfig(**{field: value})


def test_scorer_object_needs_a_score_method():
    with pytest.raises(TypeError, match="score"):
        TokenPruneConfig(scorer=object())
    assert TokenPruneConfig(scorer=AttentionScorer()).scorer_name == "AttentionScorer"


def test_dict_round_trip():
    config = TokenPruneConfig(ratio=0.5, scorer="attention", positions="contiguous", min_tokens=3, scope="image",
                              seed=7, compressor="org/compressor")
    assert TokenPruneConfig.from_dict(config.to_dict()) == config


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="ratios"):
        TokenPruneConfig.from_dict({"ratio": 0.5, "ratios": 3})


def test_replace_validates():
    config = TokenPruneConfig(ratio=0.5, scorer="random")
    assert config.replace(ratio=0.25).ratio == 0.25
    with pytest.raises(ValueError):
        config.replace(ratio=0.0)
    with pytest.raises(TypeError, match="rato"):
        config.replace(rato=0.2)
