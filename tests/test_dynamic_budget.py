"""budget="auto": the relevance-mass rule, its clamp, batches whose samples keep very different counts, and the
calibration of the threshold (saved in the compressor's config)."""

import json
import random
import re
from fractions import Fraction

import pytest
import torch
from conftest import (
    CASES,
    FAMILIES,
    check_batch_equals_each_sample_alone,
    greedy,
    images_per_sample,
    make_inputs,
    reference_greedy,
)

from hf_tokenprune import (
    Calibration,
    Compressor,
    InvalidCompressorError,
    Scorer,
    TokenPruneConfig,
    calibrate,
    prune_wrap,
    save_calibration,
    score_inputs,
)
from hf_tokenprune.pruning import cumulative_mass, mass_budget, select_mass, unit_distribution


def keep_mass(scores, mass, min_ratio=0.0, max_ratio=1.0, min_tokens=1, kind="sum"):
    """Kept positions of one unit of ``scores`` under the mass rule."""
    scores = torch.as_tensor(scores, dtype=torch.float64)[None]
    units = [[scores.shape[1]]]
    keep = select_mass(unit_distribution(scores, units, kind), torch.ones_like(scores, dtype=torch.bool), units,
                       mass, min_ratio, max_ratio, min_tokens)
    return torch.nonzero(keep[0]).flatten().tolist()


# -- the rule ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("scores", "mass", "kept"), [
    ([0.5, 0.25, 0.125, 0.125], 0.5, [0]),  # the top token alone reaches exactly the threshold
    ([0.5, 0.25, 0.125, 0.125], 0.75, [0, 1]),  # exactly reached by two
    ([0.5, 0.25, 0.125, 0.125], 0.7500001, [0, 1, 2]),  # just above: one more
    ([0.5, 0.25, 0.125, 0.125], 0.875, [0, 1, 2]),
    ([0.5, 0.25, 0.125, 0.125], 1.0, [0, 1, 2, 3]),
    ([0.125, 0.5, 0.125, 0.25], 0.75, [1, 3]),  # by relevance, returned in original order
    ([1, 1, 1, 1], 0.5, [0, 1]),  # ties: the earlier tokens
    ([1, 1, 1, 1], 0.5000001, [0, 1, 2]),
    ([0.125, 0.25, 0.25, 0.375], 0.6, [1, 3]),  # a tie at the boundary goes to the earlier token
    ([3, 0, 0, 1], 1.0, [0, 3]),  # zero-relevance tokens are never needed to reach the mass
    ([-2, 0, 0, 0], 0.5, [0, 1]),  # "sum": negatives clamp to 0, an all-zero unit is uniform
])
def test_mass_rule_keeps_the_minimal_prefix_reaching_the_threshold(scores, mass, kept):
    assert keep_mass(scores, mass) == kept


def test_mass_rule_matches_exact_arithmetic_on_random_units():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 12)
        weights = [rng.choice([0, 1, 1, 2, 3, 5, 8]) for _ in range(n)]
        if not any(weights):
            weights[0] = 1
        total = sum(weights)
        mass = Fraction(rng.randint(1, 2 * total), 2 * total)
        order = sorted(range(n), key=lambda i: (-weights[i], i))
        need = next(k for k in range(1, n + 1) if Fraction(sum(weights[i] for i in order[:k]), total) >= mass)
        assert keep_mass(weights, float(mass)) == sorted(order[:need]), (weights, mass)


def test_softmax_distribution_is_per_unit_and_matches_the_compressor_relevance():
    torch.manual_seed(0)
    compressor = Compressor(channels=(4, 8), kernel_size=3)
    features, mask = torch.rand(2, 7), torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    logits = compressor(features, mask)
    whole = unit_distribution(logits, [[7], [5]], "softmax")
    torch.testing.assert_close(whole, compressor.relevance(features, mask).double(), rtol=1e-5, atol=1e-7)
    per_image = unit_distribution(logits, [[3, 4], [2, 3]], "softmax")
    for b, start, n in [(0, 0, 3), (0, 3, 4), (1, 0, 2), (1, 2, 3)]:
        part = whole[b, start:start + n]
        torch.testing.assert_close(per_image[b, start:start + n], part / part.sum())
    assert per_image[1, 5:].eq(0).all()


@pytest.mark.parametrize(("scores", "mass", "bounds", "count"), [
    ([100, 1, 1, 1, 1, 1, 1, 1], 0.5, dict(min_ratio=0.25), 2),  # one token reaches the mass; at least 25% of 8
    ([1] * 8, 0.9, dict(max_ratio=0.5), 4),  # 8 needed; at most half
    ([1] * 8, 0.9, dict(max_ratio=0.5, min_tokens=5), 5),  # min_tokens wins over max_ratio, as with ratio=
    ([1] * 8, 0.3, dict(min_ratio=0.3, max_ratio=0.3), 3),  # equal bounds: a fixed ceil(0.3 * 8)
    ([1] * 8, 0.3, dict(), 3),
])
def test_the_kept_count_is_clamped(scores, mass, bounds, count):
    assert len(keep_mass(scores, mass, **bounds)) == count


def test_mass_budget_of_an_empty_unit_is_zero():
    assert mass_budget(torch.zeros(0, dtype=torch.float64), 0.5, 0.0, 1.0, 1) == 0
    assert cumulative_mass(torch.zeros(1, 3, dtype=torch.float64), [[0, 3]])[0][0].numel() == 0


@pytest.mark.parametrize("temperature", [0.2, 0.5, 1.0, 3.0])
def test_temperature_scales_the_distribution_and_never_reorders(temperature):
    torch.manual_seed(0)
    logits, relevance = torch.randn(2, 9, dtype=torch.float64), torch.rand(2, 9, dtype=torch.float64)
    units = [[4, 5], [9]]
    soft = unit_distribution(logits, units, "softmax", temperature)
    summed = unit_distribution(relevance, units, "sum", temperature)
    for b, start, n in [(0, 0, 4), (0, 4, 5), (1, 0, 9)]:
        torch.testing.assert_close(soft[b, start:start + n], torch.softmax(logits[b, start:start + n] / temperature, 0))
        powered = relevance[b, start:start + n] ** (1 / temperature)
        torch.testing.assert_close(summed[b, start:start + n], powered / powered.sum())
        for values, dist in ((logits, soft), (relevance, summed)):
            assert torch.equal(values[b, start:start + n].argsort(), dist[b, start:start + n].argsort())
    assert torch.equal(unit_distribution(logits, units, "softmax", 1.0), unit_distribution(logits, units, "softmax"))


def test_a_lower_temperature_never_keeps_more_tokens_at_the_same_mass():
    # the top-k share of softmax(x / T) does not decrease as T falls: focused units shrink first
    rng = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 40, (1,), generator=rng))
        logits = 3 * torch.randn(1, n, generator=rng, dtype=torch.float64)
        mass = float(torch.rand(1, generator=rng)) * 0.99 + 0.01
        counts = [mass_budget(cumulative_mass(unit_distribution(logits, [[n]], "softmax", t), [[n]])[0][0], mass,
                              0.0, 1.0, 1) for t in (4.0, 1.0, 0.5, 0.25)]
        assert counts == sorted(counts, reverse=True), (logits, mass, counts)


def test_a_sharper_distribution_moves_the_budget_to_spread_relevance():
    # one unit whose relevance sits on one token, one whose relevance is spread over 10 of its 40 tokens
    focused = torch.cat([torch.tensor([4.0]), torch.zeros(39)])
    spread = torch.cat([torch.full((10,), 2.0), torch.zeros(30)])
    scores, units = torch.stack([focused, spread]).double(), [[40], [40]]

    def counts(temperature, mass):
        cumulative = cumulative_mass(unit_distribution(scores, units, "softmax", temperature), units)
        return [mass_budget(c[0], mass, 0.0, 1.0, 1) for c in cumulative]

    # T=1: the flat tail decides: e^4 + 21 of 39 ones reach 0.8 of e^4 + 39; 10 e^2 + 10 of 30 reach 0.8 of 10 e^2 + 30
    assert counts(1.0, 0.8) == [22, 20]
    assert counts(0.25, 0.99) == [1, 10]  # sharpened: each keeps what holds its relevance


# -- configuration -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "error", "message"), [
    (dict(budget="dynamic"), ValueError, "budget must be one of"),
    (dict(budget="auto", mass=0), ValueError, r"mass must be in \(0, 1\]"),
    (dict(budget="auto", mass=1.5), ValueError, "mass must be in"),
    (dict(budget="auto", mass=float("nan")), ValueError, "mass must be in"),
    (dict(budget="auto", mass="0.5"), TypeError, "mass must be a number"),
    (dict(budget="auto", mass=True), TypeError, "mass must be a number"),
    (dict(budget="auto", min_ratio=-0.1), ValueError, r"min_ratio must be in \[0, 1\]"),
    (dict(budget="auto", max_ratio=0.0), ValueError, "max_ratio must be in"),
    (dict(budget="auto", min_ratio=0.5, max_ratio=0.25), ValueError, "must not exceed max_ratio"),
    (dict(mass=0.5), ValueError, "mass applies to budget='auto' only"),
    (dict(min_ratio=0.1, max_ratio=0.5), ValueError, "min_ratio, max_ratio apply to budget='auto'"),
    (dict(temperature=0.5), ValueError, "temperature applies to budget='auto' only"),
    *[(dict(budget="auto", temperature=t), ValueError, "temperature must be a finite number > 0")
      for t in (0, -1.0, float("inf"), float("nan"))],
    (dict(budget="auto", temperature="0.5"), TypeError, "temperature must be a number > 0"),
    *[(dict(budget="auto", scorer=s), ValueError, f"scorer '{s}' gives none")
      for s in ("random", "uniform", "tome", "fastv", "pdrop", "dart")],
])
def test_invalid_budget_fields_name_the_problem(fields, error, message):
    with pytest.raises(error, match=message):
        TokenPruneConfig(**fields)


def test_auto_config_round_trips_and_prunes_whatever_the_ratio():
    config = TokenPruneConfig(budget="auto", scorer="attention", mass=0.8, min_ratio=0.1, max_ratio=0.6, ratio=1.0,
                              temperature=0.25)
    assert TokenPruneConfig.from_dict(config.to_dict()) == config
    assert config.prunes and not TokenPruneConfig(ratio=1.0).prunes


def test_a_scorer_without_a_distribution_is_refused(built):
    class Constant(Scorer):
        def score(self, inputs):
            return torch.zeros(inputs.valid.shape)

    with pytest.raises(ValueError, match="scorer Constant has none"):
        prune_wrap(built("qwen2_vl")[0], budget="auto", mass=0.5, scorer=Constant())


# -- pruning with the rule ---------------------------------------------------------------------------------------
@pytest.fixture
def compressor_dir(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Compressor(channels=(4, 8), kernel_size=3).save_pretrained(tmp_path / "compressor")
    return tmp_path / "compressor"


class PeakedBelow(Scorer):
    """Logits ``log A^0_v`` flattened 100-fold (a near-uniform distribution, whatever the model's attention), plus a
    spike on the most attended token in samples with fewer than ``threshold`` visual tokens: at a mass of 0.6 those
    keep one token, the others about 60%."""

    distribution = "softmax"

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def score(self, inputs):
        logits = inputs.first_layer_attention.float().clamp_min(1e-12).log() / 100
        for b, n in enumerate(inputs.layout.counts):
            if n < self.threshold:
                logits[b, int(logits[b, :n].argmax())] += 100.0
        return logits


@pytest.mark.parametrize("scorer", ["peaked", "compressor"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_with_very_different_counts_equals_each_sample_alone(built, family, scorer, compressor_dir):
    model, processor = built(family)
    batch = make_inputs(processor, "image", images_per_sample=images_per_sample(family))
    counts = score_inputs(model, batch).layout.counts
    if scorer == "peaked":
        prune_wrap(model, budget="auto", mass=0.6, scorer=PeakedBelow(sum(counts) / 2))
    else:  # a sharpened distribution: counts set by the head of each sample's relevance
        prune_wrap(model, budget="auto", mass=0.6, compressor=str(compressor_dir), temperature=0.3)
    stats = check_batch_equals_each_sample_alone(model, processor, family, steps=6, logits_atol=1e-4)
    assert stats.budget == "auto" and stats.ratio is None and stats.mass == 0.6
    assert stats.temperature == (1.0 if scorer == "peaked" else 0.3)
    assert stats.retention == [a / b for a, b in zip(stats.visual_tokens_after, stats.visual_tokens_before)]
    if scorer == "peaked":
        small = counts.index(min(counts))
        assert stats.visual_tokens_after[small] == 1
        assert stats.retention[1 - small] >= 0.6
        assert "budget=auto mass=0.6 temperature=1" in str(stats)


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_auto_budget_equals_masked_reference(built, family, kind, compressor_dir):
    model, processor = built(family)
    inputs = make_inputs(processor, kind)
    scope = "image" if kind == "video" else "sample"
    prune_wrap(model, budget="auto", mass=0.4, max_ratio=0.75, compressor=str(compressor_dir), scope=scope)
    pruned = greedy(model, inputs, steps=6)
    stats = model.tokenprune.last_stats
    assert all(0 < r <= 0.75 for r in stats.retention)
    reference = reference_greedy(model, inputs, steps=6)
    assert torch.equal(pruned.sequences, reference.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(pruned.logits, reference.logits)) < 1e-4


# -- calibration -------------------------------------------------------------------------------------------------
QUESTIONS = ["what colour is the circle", "what shape is left of the red square ?", "is there a star ?",
             "what colour is the square", "how many circles are there ?", "are all the circles red ?"]


def calibration_batches(processor) -> list[dict]:
    return [make_inputs(processor, "image", questions=QUESTIONS[i:i + 3]) for i in (0, 3)]


def mean_retention(model, batches) -> float:
    retention = []
    for batch in batches:
        with torch.no_grad():
            model(**batch)
        retention += model.tokenprune.last_stats.retention
    return sum(retention) / len(retention)


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_hits_the_target_and_prune_wrap_keeps_it(built, family, compressor_dir):
    model, processor = built(family)
    batches = calibration_batches(processor)
    result = calibrate(model, batches, 0.25, compressor=str(compressor_dir))
    assert result.samples == 6 and result.target == 0.25
    assert abs(result.retention - 0.25) < 0.03
    save_calibration(compressor_dir, result)
    prune_wrap(model, budget="auto", compressor=str(compressor_dir))
    assert (model.tokenprune.config.mass, model.tokenprune.config.max_ratio) == (result.mass, 1.0)
    assert mean_retention(model, batches) == pytest.approx(result.retention, abs=1e-12)


def test_calibration_at_a_temperature_is_saved_with_it_and_prune_wrap_keeps_it(built, compressor_dir):
    model, processor = built("qwen2_vl")
    batches = calibration_batches(processor)
    result = calibrate(model, batches, 0.25, compressor=str(compressor_dir), temperature=0.5)
    assert result.temperature == 0.5 and abs(result.retention - 0.25) < 0.03
    plain = calibrate(model, batches, 0.25, compressor=str(compressor_dir))
    assert plain.temperature == 1.0 and plain.mass != result.mass  # a sharper distribution needs another threshold
    save_calibration(compressor_dir, result)
    prune_wrap(model, budget="auto", compressor=str(compressor_dir))
    assert (model.tokenprune.config.mass, model.tokenprune.config.temperature) == (result.mass, 0.5)
    assert mean_retention(model, batches) == pytest.approx(result.retention, abs=1e-12)
    with pytest.raises(ValueError, match="calibrated with temperature=0.5, not 1.0: calibrate it for this"):
        prune_wrap(model, budget="auto", compressor=str(compressor_dir), temperature=1.0)
    prune_wrap(model, budget="auto", compressor=str(compressor_dir), temperature=1.0, mass=plain.mass)
    assert mean_retention(model, batches) == pytest.approx(plain.retention, abs=1e-12)


def test_a_calibration_saved_before_temperatures_loads_at_temperature_one(compressor_dir):
    calibration = Calibration(mass=0.5, min_ratio=0.0, max_ratio=1.0, min_tokens=1, scope="sample", target=0.25,
                              retention=0.25, samples=8).to_dict()
    del calibration["temperature"]
    path = compressor_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "calibration": calibration}))
    assert Compressor.from_pretrained(compressor_dir).calibration == {**calibration, "temperature": 1.0}


def test_calibration_reaches_only_what_the_clamp_allows_and_uses_the_wrapped_compressor(built, compressor_dir):
    model, processor = built("qwen2_vl")
    batches = calibration_batches(processor)
    prune_wrap(model, ratio=0.5, compressor=str(compressor_dir))
    result = calibrate(model, batches, 0.9, max_ratio=0.5)  # the wrapped model's compressor
    assert result.mass == 1.0 and result.retention == pytest.approx(0.5, abs=0.02)
    low = calibrate(model, batches, 0.01, min_ratio=0.2)
    assert low.retention == pytest.approx(0.2, abs=0.03) and 0 < low.mass < 1e-6


def test_calibration_refuses_bad_arguments(built):
    model, processor = built("qwen2_vl")
    with pytest.raises(ValueError, match="target must be in"):
        calibrate(model, [], 0.0, scorer="attention")
    with pytest.raises(ValueError, match="scorer 'uniform' gives none"):
        calibrate(model, [], 0.25, scorer="uniform")
    with pytest.raises(ValueError, match="no visual tokens"):
        calibrate(model, [make_inputs(processor, None)], 0.25, scorer="attention")


def test_saved_calibration_round_trips_through_the_compressor_directory(built, compressor_dir, tmp_path):
    calibration = Calibration(mass=0.8125, min_ratio=0.0625, max_ratio=0.75, min_tokens=2, scope="image",
                              target=0.25, retention=0.2512, samples=40)
    save_calibration(compressor_dir, calibration)
    loaded = Compressor.from_pretrained(compressor_dir)
    assert loaded.calibration == calibration.to_dict()
    loaded.save_pretrained(tmp_path / "copy")  # the mixin's config keeps it
    assert Compressor.from_pretrained(tmp_path / "copy").calibration == calibration.to_dict()
    model = built("qwen2_vl")[0]
    prune_wrap(model, budget="auto", scope="image", max_ratio=0.5, compressor=loaded)
    config = model.tokenprune.config
    assert (config.mass, config.min_ratio, config.max_ratio) == (0.8125, 0.0625, 0.5)  # explicit fields win
    with pytest.raises(ValueError, match="calibrated with scope='image', not 'sample'"):
        prune_wrap(model, budget="auto", compressor=loaded)
    loaded.set_calibration(None)
    loaded.save_pretrained(tmp_path / "plain")
    assert "calibration" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_auto_budget_without_threshold_or_calibration_is_refused(built, compressor_dir):
    with pytest.raises(ValueError, match="budget='auto' needs a relevance-mass threshold"):
        prune_wrap(built("qwen2_vl")[0], budget="auto", compressor=str(compressor_dir))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c.update(mass=0), r"calibration: mass must be in \(0, 1\]"),
    (lambda c: c.update(mass="x"), "calibration: mass must be a number"),
    (lambda c: c.update(scope="frame"), "calibration: scope must be one of"),
    (lambda c: c.update(min_ratio=0.9), "calibration: min_ratio .* must not exceed max_ratio"),
    (lambda c: c.update(min_tokens=-1), "calibration: min_tokens"),
    (lambda c: c.update(temperature=0), "calibration: temperature must be a finite number > 0"),
    (lambda c: c.update(retention=float("inf")), "calibration: retention must be in"),
    (lambda c: c.update(samples=0), "calibration: samples must be an int >= 1"),
    (lambda c: c.update(note=1), r"unknown fields \['note'\]"),
    (lambda c: c.pop("target"), r"missing fields \['target'\]"),
])
def test_invalid_saved_calibration_is_refused_on_load(compressor_dir, edit, message):
    calibration = Calibration(mass=0.5, min_ratio=0.0, max_ratio=0.75, min_tokens=1, scope="sample", target=0.25,
                              retention=0.25, samples=8).to_dict()
    edit(calibration)
    path = compressor_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "calibration": calibration}))
    with pytest.raises(InvalidCompressorError, match=message):
        Compressor.from_pretrained(compressor_dir)
    with pytest.raises(ValueError, match=message):
        save_calibration(compressor_dir, calibration)


def test_saving_a_calibration_into_a_missing_directory_names_it_without_asking_the_hub(tmp_path, monkeypatch):
    from hf_tokenprune import CompressorNotFoundError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.hub_mixin.hf_hub_download",
                        lambda *a, **k: pytest.fail("save_calibration asked the Hub"))
    calibration = Calibration(mass=0.5, min_ratio=0.0, max_ratio=1.0, min_tokens=1, scope="sample", target=0.25,
                              retention=0.25, samples=8)
    with pytest.raises(CompressorNotFoundError,
                       match=re.escape(f"compressor directory 'missing/dir' does not exist ({tmp_path}/missing/dir)")):
        save_calibration("missing/dir", calibration)
    assert not (tmp_path / "missing").exists()


def test_calibration_that_is_not_an_object_is_refused(compressor_dir):
    path = compressor_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "calibration": [0.5]}))
    with pytest.raises(InvalidCompressorError, match="calibration must be an object"):
        Compressor.from_pretrained(compressor_dir)


def test_cli_calibrate_saves_the_threshold(built, compressor_dir, tmp_path, capsys):
    from hf_tokenprune import cli, tiny

    model, processor = built("qwen2_vl")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    rows = []
    for i, question in enumerate(QUESTIONS):
        tiny.make_image(i, size=(56 + 28 * (i % 3), 84)).save(tmp_path / f"{i}.png")
        rows.append({"question": question, "answer": "red", "image": f"{i}.png"})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["calibrate", "--model", str(tmp_path / "model"), "--compressor", str(compressor_dir), "--data",
            str(tmp_path / "data.jsonl"), "--target", "0.3", "--limit", "5", "--max-ratio", "0.8",
            "--temperature", "0.5"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    saved = Compressor.from_pretrained(compressor_dir).calibration
    assert printed["calibration"] == saved
    assert saved["samples"] == 5 and saved["max_ratio"] == 0.8 and abs(saved["retention"] - 0.3) < 0.05
    assert saved["temperature"] == 0.5
    assert "calibrate: 100%" in captured.err and "5/5" in captured.err  # a progress bar that knows the total
    assert cli.main([*argv, "--quiet"]) == 0
    assert "calibrate:" not in capsys.readouterr().err


def test_world_results_put_the_calibrated_dynamic_budget_beside_the_fixed_ratio(tmp_path):
    from hf_tokenprune.world import load, results
    from hf_tokenprune.world.evaluate import heldout_samples

    model, processor = load("qwen2_vl")
    setting = results.evaluate(model, processor, heldout_samples(4, kinds=("colour_of_shape", "left_of")),
                               label="qwen2_vl", compressor=results.shipped_compressor("qwen2_vl"), batch_size=4,
                               scorers=("compressor", "fastv"), ratios=(0.25,), targets=(0.25,),
                               temperatures=(1.0, 0.5), calibration=heldout_samples(8, start=results.CALIBRATION_START))
    assert set(setting["accuracy"]) == {"full", "compressor", "fastv", "compressor-auto"}
    assert setting["retention"]["compressor"]["0.25"] == 0.25 and setting["retention"]["fastv"]["0.25"] == 0.25
    # FastV runs its first K layers on every visual token: more prefill FLOPs at the same retention
    assert setting["prefill_flops"]["compressor"]["0.25"] < setting["prefill_flops"]["fastv"]["0.25"] < 1
    calibrated = setting["calibration"]["compressor-auto"]["0.25"]  # threshold from the 4 evaluated questions
    assert calibrated["samples"] == 4 and calibrated["retention"] == setting["retention"]["compressor-auto"]["0.25"]
    selection = calibrated["selection"]  # the temperature answering the 8 calibration questions best
    assert set(selection) == {"1", "0.5"} and all(v["retention"] > 0 for v in selection.values())
    eligible = {t: v["accuracy"] for t, v in selection.items() if v["accuracy"] is not None}
    assert all(abs(selection[t]["retention"] - 0.25) <= results.SELECTION_TOLERANCE for t in eligible)
    chosen = f"{calibrated['temperature']:g}"
    if eligible:
        assert eligible[chosen] == max(eligible.values())
    else:  # 8 questions rarely land within 1 point: the temperature nearest the target
        assert chosen == min(selection, key=lambda t: abs(selection[t]["retention"] - 0.25))
    assert 0 < calibrated["transfer"]["retention"] < 1 and 0 <= calibrated["transfer"]["accuracy"] <= 1
    assert 0 < setting["retention"]["compressor-auto"]["0.25"] < 1
    assert set(setting["per_kind"]["compressor-auto"]["0.25"]) <= {"colour_of_shape", "left_of"}
    report = {"settings": {"qwen2_vl images": setting}}
    table = results.markdown(report)
    assert "| 25% | compressor-auto (T " in table and "| 25% | fastv (in LLM) | 25.0 |" in table
    assert "* compressor-auto 25%: T 1 " in table and "; transfer: kept " in table
    kept = setting["retention_per_kind"]["compressor-auto"]["0.25"]
    assert set(kept) == set(setting["per_kind"]["compressor-auto"]["0.25"]) and all(0 < v < 1 for v in kept.values())
    assert f"({100 * kept['colour_of_shape']:.1f})" in table  # per kind: accuracy (mean kept %)
    pytest.importorskip("matplotlib")
    assert results.plot(report, tmp_path / "pareto.png") and (tmp_path / "pareto.png").stat().st_size > 0
