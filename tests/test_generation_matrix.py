"""Generation modes x adapters x dtypes with input-stage pruning (ratio 0.25, scorer="attention").

The reference is the unpruned model with the dropped tokens masked out (:mod:`hf_tokenprune.verify`); internal
consistency (assisted == greedy, one beam == greedy, streamed == returned text) holds as for the unwrapped model.
"""

import contextlib
import threading

import pytest
import torch
from conftest import CASES, FAMILIES, make_inputs
from transformers import LogitsProcessor, LogitsProcessorList, TextIteratorStreamer, TextStreamer

from hf_tokenprune import UnsupportedGenerationError, prune_wrap, tiny, unwrap
from hf_tokenprune.adapters import get_adapter
from hf_tokenprune.verify import generate_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOGIT_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
# prompt lookup on linear attention (Qwen3.5): after rejected candidates transformers rolls the recurrent state back to
# before the whole verified block, unpruned too (test_qwen3_5.py measures 9.2e-4): the logits then drift from greedy
ROLLBACK_TOL = 2e-3
STEPS = 6
RETURN = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)


@pytest.fixture(scope="module")
def typed_model():
    """``get(family, dtype)``: a tiny model in that dtype (cached), unwrapped after every test."""
    cache: dict = {}

    def get(family: str, dtype: torch.dtype):
        if (family, dtype) not in cache:
            cache[family, dtype] = tiny.build_model(family, dtype=dtype)
        return cache[family, dtype]

    yield get
    for model in cache.values():
        if "tokenprune" in model.__dict__:
            unwrap(model)


@pytest.fixture
def pruned(built, typed_model):
    """``get(family, dtype, kind, batch)``: (model wrapped at ratio 0.25, its processor's inputs)."""
    wrapped = []

    def get(family: str, dtype: torch.dtype = torch.float32, kind: str = "image", batch: int = 2):
        model = typed_model(family, dtype)
        inputs = make_inputs(built(family)[1], kind, batch=batch)
        wrapped.append(prune_wrap(model, ratio=0.25, scorer="attention"))
        return model, inputs

    yield get
    for model in wrapped:
        if "tokenprune" in model.__dict__:
            unwrap(model)


def generate(model, inputs, **kwargs):
    kwargs = {"max_new_tokens": STEPS, "min_new_tokens": STEPS, "do_sample": False, **kwargs}
    with torch.no_grad():
        return model.generate(**inputs, **kwargs)


def reference(model, inputs, **kwargs):
    """The family's reference (masked, or the pruned sequence where masking does not remove a token)."""
    return generate_reference(model, inputs, **{"max_new_tokens": STEPS, "min_new_tokens": STEPS,
                                                "do_sample": False, **kwargs})


def max_diff(a, b) -> float:
    return max((x.float() - y.float()).nan_to_num(posinf=0, neginf=0).abs().max().item() for x, y in zip(a, b))


def assert_matches(out, ref, prompt_length: int, tol: float, sampled: bool = False) -> None:
    """Same tokens and logits within ``tol``; in low precision a row may leave the reference at a near-tie (the
    reference's logit of the pruned model's token within ``tol`` of its own choice; ``sampled``: any step whose
    logits agree within ``tol``, as rounding can move a token across the top-k boundary or the draw's threshold),
    after which it is not compared: rounding differs between a shorter and a masked sequence."""
    live = torch.ones(out.sequences.shape[0], dtype=torch.bool)
    for step, (logits, ref_logits) in enumerate(zip(out.logits, ref.logits)):
        ours, theirs = out.sequences[:, prompt_length + step], ref.sequences[:, prompt_length + step]
        rows = live.nonzero().flatten()
        if not len(rows):
            break
        assert (logits[rows].float() - ref_logits[rows].float()).abs().max() < tol
        for row in rows[ours[rows] != theirs[rows]]:
            gap = ref_logits[row, theirs[row]] - ref_logits[row, ours[row]]
            assert tol > 1e-3 and (sampled or gap < tol), f"row {row} step {step}: token differs, margin {gap}"
            live[row] = False


def assert_pruned(model):
    stats = model.tokenprune.last_stats
    assert all(a < b for a, b in zip(stats.visual_tokens_after, stats.visual_tokens_before))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("family", "kind"), CASES)
def test_greedy_scores_and_logits_equal_masked_reference(pruned, family, kind, dtype):
    model, inputs = pruned(family, dtype, kind)
    out = generate(model, inputs, **RETURN)
    assert_pruned(model)
    ref = reference(model, inputs, **RETURN)
    assert len(out.scores) == len(out.logits) == STEPS
    assert_matches(out, ref, inputs["input_ids"].shape[1], LOGIT_TOL[dtype])
    if dtype == torch.float32:
        assert torch.equal(out.sequences, ref.sequences)
        assert max_diff(out.scores, ref.scores) < LOGIT_TOL[dtype]
    # scores are the processed logits: the suppressed placeholder tokens are -inf, the rest untouched
    suppressed = model.generation_config.suppress_tokens
    assert torch.isneginf(out.scores[0][:, suppressed]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("family", "kind"), CASES)
def test_seeded_sampling_equals_masked_reference(pruned, family, kind, dtype):
    """Same seed, same tokens (float32); in half precision up to near-ties (:func:`assert_matches` ``sampled``)."""
    model, inputs = pruned(family, dtype, kind)
    sample = dict(do_sample=True, top_k=20, temperature=1.5, **RETURN)
    torch.manual_seed(7)
    out = generate(model, inputs, **sample)
    assert_pruned(model)
    torch.manual_seed(7)
    assert_matches(out, reference(model, inputs, **sample), inputs["input_ids"].shape[1], LOGIT_TOL[dtype],
                   sampled=True)


def expansion_refused(model, inputs, **beams) -> bool:
    """Whether the family cannot repeat these samples for beam search with the installed transformers
    (``Adapter.expansion_refusal``: LLaVA-NeXT-Video's videos on 5.20.0); there the pruned model refuses before any
    compute and the unpruned model fails inside transformers."""
    if model.tokenprune.adapter.expansion_refusal(inputs) is None:
        return False
    with pytest.raises(UnsupportedGenerationError, match="cannot run on these inputs"):
        generate(model, inputs, **beams)
    if model.config.model_type in ("qwen3_5", "qwen3_5_moe"):  # unpruned it runs on scrambled pictures: test_qwen3_5
        return True
    with model.tokenprune.disabled(), pytest.raises(ValueError, match="non-empty list"):
        generate(model, inputs, **beams)
    return True


def assisted_refused(model, inputs, **assisted) -> bool:
    """Whether transformers refuses assisted generation for this model, pruned or not: before 5.21 it refuses models
    with a recurrent state (``_is_stateful``: Qwen3.5's linear attention)."""
    if not getattr(model, "_is_stateful", False):
        return False
    for unpruned in (False, True):
        with model.tokenprune.disabled() if unpruned else contextlib.nullcontext(), \
                pytest.raises(ValueError, match="not supported with stateful models"):
            generate(model, inputs, **assisted)
    return True


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_beam_search_equals_masked_reference(pruned, family, kind):
    """Beams of a sample share its pruned prefill; beam search then matches the masked unpruned model (float32;
    half precision: :func:`test_beam_search_stays_with_masked_reference_in_every_dtype`)."""
    model, inputs = pruned(family, kind=kind)
    beams = dict(num_beams=3, num_return_sequences=2)
    if expansion_refused(model, inputs, **beams):
        return
    out = generate(model, inputs, **beams)
    assert out.shape[0] == 4
    assert len(model.tokenprune.last_stats.kept_indices) == 6  # batch 2 x 3 beams
    assert torch.equal(out, reference(model, inputs, **beams))


class _RunningBeams(LogitsProcessor):
    """Records the running sequences of every beam-search step, in the row order of ``out.scores``."""

    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append(input_ids.clone())
        return scores


def beam_search_trace(model, inputs, generate_fn, **kwargs):
    """``(out, steps)``: beam search with ``output_scores`` and, per step, ``{prefix: log-probs}`` for each sample
    (``prefix`` the tuple of new tokens of a running beam, the log-probs its processed ``scores`` row)."""
    recorder = _RunningBeams()
    out = generate_fn(model, inputs, logits_processor=LogitsProcessorList([recorder]), return_dict_in_generate=True,
                      output_scores=True, **kwargs)
    batch = inputs["input_ids"].shape[0]
    steps = []
    for t, (running, scores) in enumerate(zip(recorder.steps, out.scores, strict=True)):
        beams = running.shape[0] // batch
        new = running[:, running.shape[1] - t:]  # generate on input_ids passes the prompt too, on inputs_embeds not
        steps.append([{tuple(new[b * beams + i].tolist()): scores[b * beams + i].float()
                       for i in range(beams)} for b in range(batch)])
    return out, steps


def beam_tolerance(dtype: torch.dtype, tokens: int) -> float:
    """Tolerance of a beam's accumulated log-prob over ``tokens`` steps: one ``eps`` of the dtype per step (bf16:
    measured per-step log-prob differences <= 3.9e-3 = eps/2 on the candidates; fp16 <= 5e-4 ~ eps/2)."""
    return tokens * (torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5)


def check_beams_near_reference(out, steps, ref, ref_steps, prompt: int, num_beams: int, num_return: int,
                               dtype: torch.dtype) -> dict:
    """Beam search of the pruned model against the masked reference, step by step and per sample. While both
    hold the same running beams, every continuation the pruned model keeps (a beam of the next step, or a returned
    sequence at the last step) must have a reference score within the tolerance of the reference's own cut-off
    (the ``num_beams``-th, at the last step the ``num_return``-th best continuation), and the same score up to
    the tolerance in both models. A sample whose running beams then leave the reference's (they re-ranked at such
    a near-tie) is not compared further; one that never leaves returns the same sequences with the same scores.
    Returns counts of the samples that stayed identical / left at a near-tie."""
    counts = {"identical": 0, "near_tie": 0}
    for b in range(len(steps[0])):
        score_o, score_r = {(): 0.0}, {(): 0.0}
        left = False
        for t, (ours, theirs) in enumerate(zip(steps, ref_steps, strict=True)):
            assert set(ours[b]) == set(theirs[b]), f"sample {b} step {t}: running beams differ without a near-tie"
            tol = beam_tolerance(dtype, t + 1)
            candidates = {}
            for prefix, logp in theirs[b].items():
                top = (score_r[prefix] + logp).topk(2 * num_beams)
                candidates.update({prefix + (v,): s for s, v in zip(top.values.tolist(), top.indices.tolist())})
            keep = num_beams if t < len(steps) - 1 else num_return
            cutoff = sorted(candidates.values(), reverse=True)[keep - 1]
            if t < len(steps) - 1:
                kept_o, kept_r = set(steps[t + 1][b]), set(ref_steps[t + 1][b])
            else:
                rows = range(b * num_return, (b + 1) * num_return)
                kept_o = {tuple(out.sequences[r, prompt:].tolist()) for r in rows}
                kept_r = {tuple(ref.sequences[r, prompt:].tolist()) for r in rows}
            for seq in kept_o:
                prefix, token = seq[:-1], seq[-1]
                theirs_score = (score_r[prefix] + theirs[b][prefix][token]).item()
                ours_score = (score_o[prefix] + ours[b][prefix][token]).item()
                assert theirs_score >= cutoff - tol, (
                    f"sample {b} step {t}: kept {seq} scores {theirs_score:.5f} in the reference, below its cut-off "
                    f"{cutoff:.5f} by more than {tol:.1e}")
                assert abs(ours_score - theirs_score) <= tol, f"sample {b} step {t}: score of {seq} differs"
                score_o[seq], score_r[seq] = ours_score, theirs_score
            if kept_o != kept_r:
                left = True
                break
        if not left:
            rows = slice(b * num_return, (b + 1) * num_return)
            ours_seq, ref_seq = out.sequences[rows, prompt:], ref.sequences[rows, prompt:]
            ours_scores, ref_scores = out.sequences_scores[rows], ref.sequences_scores[rows]
            tol = beam_tolerance(dtype, len(steps)) / len(steps)  # sequences_scores: divided by the length
            for i in range(num_return):
                j = next(j for j in range(num_return) if torch.equal(ref_seq[j], ours_seq[i]))
                assert abs(ours_scores[i] - ref_scores[j]) <= tol
                assert abs(ref_scores[i] - ref_scores[j]) <= tol  # order differs only at a near-tie
        counts["near_tie" if left else "identical"] += 1
    return counts


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("family", "kind"), CASES)
def test_beam_search_stays_with_masked_reference_in_every_dtype(pruned, family, kind, dtype):
    """Beam search in the model's dtype against the masked reference in the same dtype: beams may re-rank only at
    a near-tie of the reference (:func:`check_beams_near_reference`); float32 gives the same sequences."""
    model, inputs = pruned(family, dtype, kind)
    beams = dict(num_beams=3, num_return_sequences=2)
    if expansion_refused(model, inputs, **beams):
        return
    out, steps = beam_search_trace(model, inputs, generate, **beams)
    assert_pruned(model)
    ref, ref_steps = beam_search_trace(model, inputs, reference, **beams)
    counts = check_beams_near_reference(out, steps, ref, ref_steps, inputs["input_ids"].shape[1], 3, 2, dtype)
    if dtype == torch.float32:
        assert torch.equal(out.sequences, ref.sequences) and counts["near_tie"] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_beam_tolerance_rejects_the_unmasked_model(pruned, family, dtype):
    """The half-precision criterion is not vacuous: the unpruned model without the mask (which still sees the
    dropped tokens) fails it against the masked reference."""
    model, inputs = pruned(family, dtype, "image")
    beams = dict(num_beams=3, num_return_sequences=2)
    if expansion_refused(model, inputs, **beams):
        return
    beam_search_trace(model, inputs, generate, **beams)
    ref, ref_steps = beam_search_trace(model, inputs, reference, **beams)
    with model.tokenprune.disabled():
        full, full_steps = beam_search_trace(model, inputs, generate, **beams)
    with pytest.raises(AssertionError):
        check_beams_near_reference(full, full_steps, ref, ref_steps, inputs["input_ids"].shape[1], 3, 2, dtype)


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_one_beam_equals_greedy(pruned, family, kind):
    model, inputs = pruned(family, kind=kind)
    greedy = generate(model, inputs, **RETURN)
    beam = generate(model, inputs, num_beams=1, num_return_sequences=1, **RETURN)
    assert torch.equal(beam.sequences, greedy.sequences)
    assert max_diff(beam.logits, greedy.logits) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("family", "kind"), CASES)
def test_prompt_lookup_decoding_equals_greedy_and_masked_reference(pruned, family, kind, dtype):
    """Assisted decoding verifies several candidate tokens per forward over the pruned cache (batch 1 only, as
    in transformers); rejected candidates are cropped from the shorter cache."""
    model, inputs = pruned(family, dtype, kind, batch=1)
    if assisted_refused(model, inputs, prompt_lookup_num_tokens=3):
        return
    greedy = generate(model, inputs, max_new_tokens=12, min_new_tokens=12, **RETURN)
    lookup = generate(model, inputs, max_new_tokens=12, min_new_tokens=12, prompt_lookup_num_tokens=3, **RETURN)
    assert_pruned(model)
    tol = LOGIT_TOL[dtype] if get_adapter(model).masking_removes_tokens else max(ROLLBACK_TOL, LOGIT_TOL[dtype])
    assert torch.equal(lookup.sequences, greedy.sequences)
    assert max_diff(lookup.logits, greedy.logits) < tol
    ref = reference(model, inputs, max_new_tokens=12, min_new_tokens=12, prompt_lookup_num_tokens=3, **RETURN)
    assert_matches(lookup, ref, inputs["input_ids"].shape[1], tol)


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_draft_model_decoding_equals_greedy(pruned, family, kind):
    """An unwrapped draft proposes from the full prompt; the pruned main model decides, so the output is its
    greedy output."""
    model, inputs = pruned(family, kind=kind, batch=1)
    draft = tiny.build_model(family, seed=1)
    if assisted_refused(model, inputs, assistant_model=draft):
        return
    greedy = generate(model, inputs, max_new_tokens=10, min_new_tokens=10)
    assisted = generate(model, inputs, max_new_tokens=10, min_new_tokens=10, assistant_model=draft)
    assert_pruned(model)
    assert torch.equal(assisted, greedy)


def _count_forwards(model) -> list:
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_draft_model_is_refused_before_compute(pruned, family):
    model, inputs = pruned(family, batch=1)
    draft = prune_wrap(tiny.build_model(family, seed=1), ratio=0.5, scorer="attention")
    calls = _count_forwards(model) + _count_forwards(draft)
    with pytest.raises(UnsupportedGenerationError, match="pruned assistant_model"):
        generate(model, inputs, assistant_model=draft)
    # unpruned, transformers < 5.21 refuses assisted generation of a model with a recurrent state (Qwen3.5) first
    stateful = getattr(model, "_is_stateful", False)
    refusal = "not supported with stateful models" if stateful else "is the assistant_model"
    with model.tokenprune.disabled(), pytest.raises(ValueError, match=refusal):
        generate(model, inputs, assistant_model=draft)
    assert not calls
    if stateful:
        return
    with draft.tokenprune.disabled():  # an unpruned draft is fine
        assert generate(model, inputs, assistant_model=draft).shape[1] == inputs["input_ids"].shape[1] + STEPS


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_streamers_stream_the_returned_text(pruned, built, capsys, family, kind):
    model, inputs = pruned(family, kind=kind, batch=1)
    processor_tokenizer = built(family)[1].tokenizer
    out = generate(model, inputs, max_new_tokens=10, min_new_tokens=10,
                   streamer=TextStreamer(processor_tokenizer, skip_prompt=True))
    assert_pruned(model)
    returned = processor_tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])
    assert capsys.readouterr().out.strip() == returned.strip()
    streamer = TextIteratorStreamer(processor_tokenizer, skip_prompt=True)
    thread = threading.Thread(target=generate, args=(model, inputs),
                              kwargs=dict(max_new_tokens=10, min_new_tokens=10, streamer=streamer))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed.strip() == returned.strip()
