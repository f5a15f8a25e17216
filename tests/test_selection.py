"""Set selection: DivPrune (max-min diversity), CDPruner (conditional DPP) and compressor+dpp.

Each selection equals a plain reference written here: a max-min greedy over an explicit N x N distance matrix,
and a DPP greedy that recomputes ``log det L[Y + i, Y + i]`` from scratch with ``torch.linalg.slogdet``. Then the
properties the methods exist for (one token per cluster of near-duplicates; the instruction decides which cluster
keeps more), a left-padded batch equal to each sample alone, and the three methods behind ``prune_wrap``.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import REGISTERED_FAMILIES as FAMILIES
from conftest import check_batch_equals_each_sample_alone, greedy, make_inputs, masked_greedy

from hf_tokenprune import (
    Calibration,
    Compressor,
    Scorer,
    calibrate,
    prune_wrap,
    save_calibration,
    score_inputs,
)
from hf_tokenprune.adapters.base import VisualLayout
from hf_tokenprune.scorers import CDPrunerScorer, CompressorDPPScorer, DivPruneScorer, ScoreInputs
from hf_tokenprune.scorers.divprune import max_min_select
from hf_tokenprune.scorers.dpp import greedy_map


# -- the references --------------------------------------------------------------------------------------------
def reference_max_min(x: torch.Tensor, k: int) -> list[int]:
    """Greedy max-min diversity on the full cosine-distance matrix."""
    v = x / x.norm(dim=-1, keepdim=True)
    distance = 1 - v @ v.T
    n = len(x)
    nearest = [min(distance[i, j].item() for j in range(n) if j != i) for i in range(n)]
    picked = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(picked) < k:
        gaps = {i: min(distance[i, s].item() for s in picked) for i in range(n) if i not in picked}
        picked.append(max(gaps, key=lambda i: (gaps[i], -i)))
    return picked


def reference_dpp(x: torch.Tensor, r: torch.Tensor, k: int) -> list[int]:
    """Greedy DPP MAP: each step adds the token maximising ``log det`` of the kept set's kernel, from scratch."""
    v = x / x.norm(dim=-1, keepdim=True)
    kernel = r[:, None] * (v @ v.T) * r[None, :]
    picked: list[int] = []
    while len(picked) < k:
        best, best_logdet = None, -float("inf")
        for i in range(len(x)):
            if i in picked:
                continue
            sign, logdet = torch.linalg.slogdet(kernel[picked + [i]][:, picked + [i]])
            if sign > 0 and logdet > best_logdet:
                best, best_logdet = i, logdet.item()
        picked.append(best)
    return picked


def reference_relevance(visual: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
    """CDPruner's relevance of one unit: mean cosine to the instruction tokens, min-max normalised."""
    mean = torch.stack([F.cosine_similarity(visual, t[None], dim=-1) for t in instruction]).mean(dim=0)
    return (mean - mean.min()) / (mean.max() - mean.min())


# -- synthetic inputs: embeddings only, no model ---------------------------------------------------------------
def synthetic_inputs(samples: list[tuple[torch.Tensor, list[int], torch.Tensor]], scope: str) -> ScoreInputs:
    """A left-padded batch: sample ``b`` is ``(visual [n, d], its units' lengths, instruction [m, d])``, laid out as
    padding (large random vectors, which must be ignored), visual tokens, instruction tokens."""
    length = max(len(v) + len(t) for v, _, t in samples)
    hidden = samples[0][0].shape[1]
    embeds = 100 * torch.randn(len(samples), length, hidden, dtype=samples[0][0].dtype,
                               generator=torch.Generator().manual_seed(9))
    visual_mask = torch.zeros(len(samples), length, dtype=torch.bool)
    instruction_mask = torch.zeros_like(visual_mask)
    for b, (visual, _, text) in enumerate(samples):
        start = length - len(visual) - len(text)
        embeds[b, start:start + len(visual)] = visual
        embeds[b, start + len(visual):] = text
        visual_mask[b, start:start + len(visual)] = True
        instruction_mask[b, start + len(visual):] = True
    attention_mask = (visual_mask | instruction_mask).long()
    segments = [units for _, units, _ in samples]
    units = segments if scope == "image" else [[sum(s)] for s in segments]
    return ScoreInputs(None, embeds, attention_mask, None, VisualLayout(visual_mask, instruction_mask, segments),
                       units)


def random_sample(seed: int, units: list[int], hidden: int = 12, text: int = 5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(sum(units), hidden, dtype=torch.float64, generator=g), units,
            torch.randn(text, hidden, dtype=torch.float64, generator=g))


def kept_sets(keep: torch.Tensor, units: list[list[int]]) -> list[list[list[int]]]:
    """Per sample and unit: the kept positions within the unit."""
    out = []
    for b, lengths in enumerate(units):
        starts = [sum(lengths[:u]) for u in range(len(lengths))]
        out.append([torch.nonzero(keep[b, s:s + n]).flatten().tolist() for s, n in zip(starts, lengths)])
    return out


# -- equal to the references -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "k", "hidden", "seed"), [(2, 1, 3, 0), (17, 1, 8, 1), (30, 7, 8, 2), (40, 25, 16, 3),
                                                        (64, 16, 4, 4)])
def test_max_min_greedy_equals_the_plain_reference(n, k, hidden, seed):
    x = torch.randn(n, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert max_min_select(x, k).tolist() == reference_max_min(x, k)


@pytest.mark.parametrize(("n", "k", "hidden", "seed"), [(2, 1, 3, 0), (17, 1, 8, 1), (30, 7, 8, 2), (40, 12, 16, 3),
                                                        (25, 16, 16, 4)])
def test_dpp_greedy_equals_the_log_determinant_reference(n, k, hidden, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, dtype=torch.float64, generator=g)
    r = 0.1 + torch.rand(n, dtype=torch.float64, generator=g)  # the greedy is scale-free: no max of 1 needed
    assert greedy_map(x, r, k).tolist() == reference_dpp(x, r, k)


def test_dpp_stops_at_the_kernel_rank_and_fills_by_relevance():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 3, dtype=torch.float64, generator=g)  # rank 3: a fourth token adds no volume
    r = torch.rand(12, dtype=torch.float64, generator=g)
    picked = greedy_map(x, r, 7).tolist()
    assert picked[:3] == reference_dpp(x, r, 3)
    rest = [i for i in torch.sort(r, descending=True).indices.tolist() if i not in picked[:3]]
    assert picked[3:] == rest[:4]


@pytest.mark.parametrize("scope", ["sample", "image"])
def test_divprune_selects_each_unit_like_the_reference(scope):
    inputs = synthetic_inputs([random_sample(0, [9, 14]), random_sample(1, [20])], scope)
    counts = [[2 + n // 3 for n in lengths] for lengths in inputs.units]
    scorer = DivPruneScorer()
    keep = scorer.select(inputs, scorer.score(inputs), counts)
    visual = inputs.visual_embeds
    for b, units in enumerate(kept_sets(keep, inputs.units)):
        start = 0
        for u, kept in enumerate(units):
            n = inputs.units[b][u]
            assert kept == sorted(reference_max_min(visual[b, start:start + n], counts[b][u]))
            start += n


@pytest.mark.parametrize("scope", ["sample", "image"])
def test_cdpruner_relevance_and_selection_equal_the_references(scope):
    samples = [random_sample(2, [11, 8]), random_sample(3, [15], text=2)]
    inputs = synthetic_inputs(samples, scope)
    counts = [[1 + n // 3 for n in lengths] for lengths in inputs.units]
    scorer = CDPrunerScorer()
    scores = scorer.score(inputs)
    keep = scorer.select(inputs, scores, counts)
    for b, (visual, _, text) in enumerate(samples):
        start = 0
        for u, kept in enumerate(kept_sets(keep, inputs.units)[b]):
            n = inputs.units[b][u]
            r = reference_relevance(visual[start:start + n], text)
            torch.testing.assert_close(scores[b, start:start + n], r)
            assert kept == sorted(reference_dpp(visual[start:start + n], r, counts[b][u]))
            start += n
        assert not scores[b, start:].any()  # padding


@pytest.mark.parametrize("scorer", [DivPruneScorer(), CDPrunerScorer()], ids=["divprune", "cdpruner"])
@pytest.mark.parametrize("scope", ["sample", "image"])
def test_left_padded_batch_selects_as_each_sample_alone(scorer, scope):
    samples = [random_sample(6, [7, 10]), random_sample(7, [30, 4], text=9)]
    batch = synthetic_inputs(samples, scope)
    counts = [[1 + n // 4 for n in lengths] for lengths in batch.units]
    keep = scorer.select(batch, scorer.score(batch), counts)
    for b, sample in enumerate(samples):
        alone = synthetic_inputs([sample], scope)
        alone_keep = scorer.select(alone, scorer.score(alone), counts[b:b + 1])
        width = alone_keep.shape[1]
        assert torch.equal(alone_keep[0], keep[b, :width]) and not keep[b, width:].any()


# -- the properties ---------------------------------------------------------------------------------------------
CLUSTERS, PER_CLUSTER, HIDDEN = 5, 8, 64


def clustered(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens in ``CLUSTERS`` clusters of near-duplicates (noise of norm about 0.01 around random unit centres), in
    shuffled order: (embeddings, cluster of each token, centres)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(CLUSTERS, HIDDEN, generator=g), dim=-1)
    cluster = torch.arange(CLUSTERS).repeat_interleave(PER_CLUSTER)[torch.randperm(CLUSTERS * PER_CLUSTER, generator=g)]
    noise = 0.01 * torch.randn(len(cluster), HIDDEN, generator=g) / HIDDEN ** 0.5
    return centres[cluster] + noise, cluster, centres


@pytest.mark.parametrize("seed", range(5))
def test_divprune_keeps_one_token_of_each_cluster_before_any_second(seed):
    x, cluster, _ = clustered(seed)
    order = cluster[max_min_select(x, 2 * CLUSTERS)].tolist()  # the pick order
    assert sorted(order[:CLUSTERS]) == list(range(CLUSTERS))
    inputs = synthetic_inputs([(x, [len(x)], x[:1])], "sample")
    keep = DivPruneScorer().select(inputs, torch.zeros(1, len(x)), [[CLUSTERS]])
    assert sorted(cluster[keep[0]].tolist()) == list(range(CLUSTERS))


@pytest.mark.parametrize("seed", range(5))
def test_cdpruner_keeps_more_of_the_cluster_the_instruction_is_about(seed):
    x, cluster, centres = clustered(seed)
    g = torch.Generator().manual_seed(100 + seed)
    scorer = CDPrunerScorer()
    kept = {}
    for target in (0, 1):  # an instruction similar to cluster A = 0, then to cluster B = 1
        text = centres[target] + 0.3 * torch.randn(4, HIDDEN, generator=g) / HIDDEN ** 0.5
        inputs = synthetic_inputs([(x, [len(x)], text)], "sample")
        keep = scorer.select(inputs, scorer.score(inputs), [[2 * CLUSTERS]])
        kept[target] = cluster[keep[0]]
    assert (kept[0] == 0).sum() > (kept[1] == 0).sum()
    assert (kept[1] == 1).sum() > (kept[0] == 1).sum()


# -- behind prune_wrap ------------------------------------------------------------------------------------------
def tiny_compressor() -> Compressor:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Compressor(channels=(4, 8), kernel_size=3)


METHODS = {"divprune": {}, "cdpruner": {}, "compressor+dpp": {"compressor": tiny_compressor()}}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_each_sample_alone(built, family, method):
    model, processor = built(family)
    prune_wrap(model, ratio=0.25, scorer=method, **METHODS[method])
    stats = check_batch_equals_each_sample_alone(model, processor, family, steps=4, logits_atol=1e-4)
    assert stats.visual_tokens_after == [-(-n // 4) for n in stats.visual_tokens_before]


@pytest.mark.parametrize("method", ["cdpruner", "compressor+dpp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_auto_budget_batch_equals_each_sample_alone(built, family, method):
    model, processor = built(family)
    prune_wrap(model, budget="auto", mass=0.5, scorer=method, **METHODS[method])
    stats = check_batch_equals_each_sample_alone(model, processor, family, steps=4, logits_atol=1e-4)
    assert stats.budget == "auto" and all(0 < r < 1 for r in stats.retention)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("family", "kind"), [("qwen2_vl", "video"), ("llava_onevision", "video"),
                                              ("llava", "image")])
def test_scope_image_selects_within_each_image_or_frame(built, family, kind, method):
    model, processor = built(family)
    inputs = make_inputs(processor, kind, images_per_sample=(2, 1) if kind == "image" else None)
    prune_wrap(model, ratio=0.25, scorer=method, scope="image", **METHODS[method])
    pruned = greedy(model, inputs, steps=3)
    stats = model.tokenprune.last_stats
    found = score_inputs(model, inputs, scope="image")
    assert max(len(u) for u in found.units) > 1
    scorer = model.tokenprune.scorer
    scores = scorer.score(found)
    visual = found.visual_embeds
    for b, lengths in enumerate(found.units):
        expected, start = [], 0
        for n in lengths:
            k = -(-n // 4)
            unit = visual[b, start:start + n]
            picked = (reference_max_min(unit, k) if method == "divprune" else  # float32, as the model: video
                      reference_dpp(unit, scores[b, start:start + n].to(unit.dtype), k))  # frames hold near-ties
            expected += [start + i for i in sorted(picked)]
            start += n
        assert stats.kept_indices[b].tolist() == expected
    reference = masked_greedy(model, inputs, steps=3)
    assert torch.equal(pruned.sequences, reference.sequences)


def test_compressor_dpp_uses_the_compressor_relevance_and_its_calibration(built, tmp_path):
    model, processor = built("qwen2_vl")
    inputs = make_inputs(processor, "image")
    compressor = tiny_compressor()
    compressor.save_pretrained(tmp_path / "compressor")
    prune_wrap(model, ratio=0.25, scorer="compressor+dpp", compressor=str(tmp_path / "compressor"))
    assert isinstance(model.tokenprune.scorer, CompressorDPPScorer)
    greedy(model, inputs, steps=1)
    kept = model.tokenprune.last_stats.kept_indices
    found = score_inputs(model, inputs)
    with torch.no_grad():
        relevance = compressor.relevance(found.first_layer_attention, found.valid)
    for b, n in enumerate(found.layout.counts):
        expected = reference_dpp(found.visual_embeds[b, :n].double(), relevance[b, :n].double(), -(-n // 4))
        assert kept[b].tolist() == sorted(expected)
    # budget="auto": the compressor's saved calibration, and the same counts as scorer="compressor"
    save_calibration(tmp_path / "compressor", Calibration(mass=0.6, min_ratio=0.0, max_ratio=1.0, min_tokens=1,
                                                          scope="sample", target=0.25, retention=0.25, samples=4,
                                                          temperature=0.5))
    after = {}
    for method in ("compressor", "compressor+dpp"):
        prune_wrap(model, budget="auto", scorer=method, compressor=str(tmp_path / "compressor"))
        assert (model.tokenprune.config.mass, model.tokenprune.config.temperature) == (0.6, 0.5)
        greedy(model, inputs, steps=1)
        after[method] = model.tokenprune.last_stats
    assert after["compressor+dpp"].visual_tokens_after == after["compressor"].visual_tokens_after
    assert after["compressor+dpp"].kept_indices[0].tolist() != after["compressor"].kept_indices[0].tolist()


def test_calibrating_compressor_dpp_finds_the_compressor_threshold(built):
    model, processor = built("qwen2_vl")
    batches = [make_inputs(processor, "image", questions=["what colour is the circle", "is there a star ?", "what"])]
    compressor = tiny_compressor()
    prune_wrap(model, ratio=0.25, scorer="compressor+dpp", compressor=compressor)
    ours = calibrate(model, batches, target=0.25, scorer="compressor+dpp", temperature=0.5)  # the wrapped compressor
    plain = calibrate(model, batches, target=0.25, compressor=compressor, temperature=0.5)
    assert ours.mass == pytest.approx(plain.mass, abs=1e-9) and ours.retention == plain.retention


def test_divprune_refuses_the_auto_budget_by_name():
    from hf_tokenprune import TokenPruneConfig

    with pytest.raises(ValueError, match="scorer 'divprune' gives none"):
        TokenPruneConfig(budget="auto", scorer="divprune", mass=0.5)


def test_a_select_that_breaks_the_budget_is_refused(built):
    model, processor = built("qwen2_vl")

    class KeepsAll(Scorer):
        def score(self, inputs):
            return torch.zeros(inputs.valid.shape)

        def select(self, inputs, scores, counts):
            return inputs.valid.clone()

    prune_wrap(model, ratio=0.25, scorer=KeepsAll())
    with pytest.raises(ValueError, match=r"KeepsAll.select kept \[\[16\], \[48\]\] tokens per budget unit; the budget "
                                         r"is \[\[4\], \[12\]\]"):
        greedy(model, make_inputs(processor, "image"), steps=1)
