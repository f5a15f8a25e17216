"""Untrusted input: corrupted compressor directories, and processor outputs that do not match the model.

A compressor directory either loads with exactly the weights its file holds or raises one of the documented
errors (:class:`InvalidCompressorError`, :class:`CompressorNotFoundError` for a missing file); mismatched visual
inputs give transformers' own error or one of ours, never an IndexError from our slicing.
"""

import json
import os
import random
import traceback

import pytest
import torch
from conftest import FAMILIES, greedy, make_inputs
from safetensors.torch import load_file, save_file

from hf_tokenprune import (
    Compressor,
    InvalidCompressorError,
    MalformedVisualInputError,
    PrunedCacheError,
    prune_wrap,
    tiny,
)
from hf_tokenprune.verify import drop_mask, generate_reference

FUZZ_CASES = int(os.environ.get("HF_TOKENPRUNE_FUZZ_CASES", "240"))
VALUES = [None, True, -1, 0, 3, 2**40, 1e308, float("nan"), "x", "", [], [4], [4, 8], [2**31], ["a"], {}, {"a": 1},
          [[4]], 5.5, "first_layer_attention", "layer_attention"]
GARBAGE = ["{", "", "null", "[1, 2]", "3", '"text"', "\udcff", '{"channels": [4, 8], "kernel_size": 3,', "1e999999",
           "NaN", '{"channels": NaN}']
DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool, torch.uint8]
CORRUPTIONS = ("field", "missing field", "extra field", "garbage json", "truncated weights", "flipped byte",
               "shape", "missing tensor", "extra tensor", "renamed tensor", "dtype", "no weights")


def corrupt(rng: random.Random, config: dict, weights: dict, directory) -> str:
    """Write a corrupted copy of a valid compressor into ``directory``; return the corruption's name."""
    kind = rng.choice(CORRUPTIONS)
    config, weights = dict(config), dict(weights)
    key = rng.choice(sorted(weights))
    if kind == "field":
        config[rng.choice(sorted(config))] = rng.choice(VALUES)
    elif kind == "missing field":
        config.pop(rng.choice(sorted(config)))
    elif kind == "extra field":
        config[rng.choice(["note", "in_channels", "config", "model_id", "strict"])] = rng.choice(VALUES)
    elif kind == "shape":
        shape = [max(1, n + rng.choice([-1, 1])) for n in weights[key].shape] + [1] * rng.randint(0, 1)
        weights[key] = torch.zeros(shape if shape != list(weights[key].shape) else [*shape, 2])
    elif kind == "missing tensor":
        weights.pop(key)
    elif kind == "extra tensor":
        weights["extra.weight"] = torch.zeros(3)
    elif kind == "renamed tensor":
        weights[key + rng.choice(["x", ".0"])] = weights.pop(key)
    elif kind == "dtype":
        weights[key] = weights[key].to(rng.choice(DTYPES))
    directory.mkdir()
    text = rng.choice(GARBAGE) if kind == "garbage json" else json.dumps(config)
    (directory / "config.json").write_text(text, errors="surrogateescape")
    save_file(weights, directory / "model.safetensors")
    data = bytearray((directory / "model.safetensors").read_bytes())
    if kind == "truncated weights":
        data = data[:rng.randrange(len(data))]
    elif kind == "flipped byte":
        data[rng.randrange(len(data))] = rng.randrange(256)
    (directory / "model.safetensors").write_bytes(bytes(data))
    if kind == "no weights":
        (directory / "model.safetensors").unlink()
    return kind


def test_corrupted_compressor_directories_load_exactly_or_raise_documented_errors(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        good = Compressor(channels=(4, 8), kernel_size=3, base_model_type="qwen2_vl")
    good.save_pretrained(tmp_path / "good")
    config = json.loads((tmp_path / "good" / "config.json").read_text())
    weights = load_file(tmp_path / "good" / "model.safetensors")
    features = torch.rand(3, 11)
    rng = random.Random(0)
    outcomes: dict[tuple[str, str], int] = {}
    for i in range(FUZZ_CASES):
        directory = tmp_path / f"case{i}"
        kind = corrupt(rng, config, weights, directory)
        try:
            loaded = Compressor.from_pretrained(directory)
        except (InvalidCompressorError, FileNotFoundError) as err:
            outcome = type(err).__name__
            assert str(err)
        else:
            outcome = "loaded"
            # exactly the file's tensors (cast to the parameters' dtype), and the behaviour they define
            stored = load_file(directory / "model.safetensors")
            state = loaded.state_dict()
            assert stored.keys() == state.keys()
            assert all(torch.equal(stored[k].to(state[k].dtype), state[k]) for k in state)
            twin = Compressor(**{k: v for k, v in json.loads((directory / "config.json").read_text()).items()
                                 if k in ("channels", "kernel_size", "feature", "in_channels")})
            twin.load_state_dict({k: v.to(torch.float32) for k, v in stored.items()})
            assert all(torch.isfinite(t).all() for t in state.values())
            if loaded.in_channels == 1:  # NaN where huge finite weights overflow, then in both
                same = dict(rtol=0, atol=0, equal_nan=True)
                torch.testing.assert_close(loaded.relevance(features), twin.relevance(features), **same)
                if all(torch.equal(stored[k], weights[k]) for k in weights):
                    torch.testing.assert_close(loaded.relevance(features), good.relevance(features), **same)
        outcomes[kind, outcome] = outcomes.get((kind, outcome), 0) + 1
    # every corruption was tried, and the invalid ones were refused
    assert {kind for kind, _ in outcomes} == set(CORRUPTIONS)
    for kind in ("garbage json", "truncated weights", "missing tensor", "extra tensor", "renamed tensor", "shape"):
        assert (kind, "loaded") not in outcomes, kind
    assert outcomes.get(("no weights", "CompressorNotFoundError"))


@pytest.mark.parametrize(("name", "value", "message"), [
    ("channels", [2**31], "channels entries"),
    ("channels", list(range(1, 40)), "at most 16 layers"),
    ("kernel_size", 4, "kernel_size must be an odd int"),
    ("feature", "pixels", "feature must be one of"),
    ("base_model_type", 3, "base_model_type must be a str"),
])
def test_invalid_compressor_field_is_named_before_allocation(tmp_path, name, value, message):
    Compressor(channels=(4,), kernel_size=3).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, name: value}))
    with pytest.raises(InvalidCompressorError, match=message):
        Compressor.from_pretrained(tmp_path)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda w: w.to(torch.int64), "'head.weight' has dtype I64"),
    (lambda w: w.fill_(float("nan")), "'head.weight' holds non-finite values"),
    (lambda w: w.fill_(float("inf")), "'head.weight' holds non-finite values"),
])
def test_non_float_or_non_finite_weights_are_refused(tmp_path, edit, message):
    Compressor(channels=(4,), kernel_size=3).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["head.weight"] = edit(weights["head.weight"])
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(InvalidCompressorError, match=message):
        Compressor.from_pretrained(tmp_path)


OURS = (MalformedVisualInputError, PrunedCacheError)


def _mismatches(family: str, inputs: dict, model) -> dict[str, dict]:
    """Processor outputs edited so that the visual inputs and the placeholders disagree."""
    ids, image = inputs["input_ids"], model.config.image_token_id
    first = int((ids[0] == image).nonzero()[0])
    fewer_tokens = ids.clone()
    fewer_tokens[0, first] = ids[0, -1]
    extra_tokens = ids.clone()
    extra_tokens[1, -3] = image
    one_image = inputs["pixel_values"][:4 if family.startswith("qwen") else 1]
    out = {"fewer image tokens": {"input_ids": fewer_tokens}, "more image tokens": {"input_ids": extra_tokens},
           "pixel values of one image dropped": {"pixel_values": one_image}}
    if "image_grid_thw" in inputs:
        grid = inputs["image_grid_thw"].clone()
        grid[0, 1], grid[0, 2] = grid[0, 2] * 2, max(1, int(grid[0, 1]) // 2)
        out["grid that does not match the pixels"] = {"image_grid_thw": grid}
        out["pixel values truncated"] = {"pixel_values": inputs["pixel_values"][:-4]}
        out["grids of the two images swapped"] = {"image_grid_thw": inputs["image_grid_thw"].flip(0)}
    if "image_sizes" in inputs:
        out["image sizes swapped"] = {"image_sizes": inputs["image_sizes"].flip(1)}
        out["images in the other order"] = {"pixel_values": inputs["pixel_values"].flip(0),
                                            "image_sizes": inputs["image_sizes"].flip(0)}
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_mismatched_visual_inputs_never_raise_from_our_slicing(built, family):
    model, processor = built(family)
    inputs = make_inputs(processor, "image")
    cases = _mismatches(family, inputs, model)
    calls = (_error, _generate_error)
    unwrapped = {(name, call): call(model, {**inputs, **edit}) for name, edit in cases.items() for call in calls}
    prune_wrap(model, ratio=0.25, scorer="attention")
    for name, edit in cases.items():
        for call in calls:
            err = call(model, {**inputs, **edit})
            if err is None:  # transformers accepts it and so do we (e.g. its checks only compare totals)
                continue
            # raised in our code: one of our errors (never an IndexError from our slicing); in transformers': the
            # error the unwrapped model raises (Qwen2.5-VL's vision encoder itself raises an IndexError on missing
            # pixel values)
            last = traceback.extract_tb(err.__traceback__)[-1].filename
            if f"{os.sep}hf_tokenprune{os.sep}" in last:
                assert isinstance(err, OURS), (name, type(err), err)
            else:
                assert type(err) is type(unwrapped[name, call]), (name, err, unwrapped[name, call])


def _error(model, inputs) -> Exception | None:
    try:
        with torch.no_grad():
            model(**inputs)
    except Exception as err:  # noqa: BLE001 - the error is what is tested
        return err
    return None


def _generate_error(model, inputs) -> Exception | None:
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2)
    except Exception as err:  # noqa: BLE001
        return err
    return None


def test_a_compressor_whose_weights_overflow_is_refused_at_scoring(built):
    """Finite but huge weights load (they are what the file holds) and give NaN relevance: pruning refuses it."""
    model, processor = built("qwen2_vl")
    compressor = Compressor(channels=(4,), kernel_size=3, base_model_type="qwen2_vl")
    with torch.no_grad():
        for parameter in compressor.parameters():
            parameter.fill_(3e38)
    assert compressor.relevance(torch.rand(1, 5)).isnan().all()
    prune_wrap(model, ratio=0.5, compressor=compressor)
    with pytest.raises(ValueError, match="returned NaN scores"), torch.no_grad():
        model(**make_inputs(processor, "image"))


# families whose videos have a placeholder token of their own (SmolVLM's and InternVL's video frames are image
# placeholders)
VIDEO_FAMILIES = [f for f in FAMILIES if "video" in tiny.MODALITIES[f] and f not in ("smolvlm", "internvl")]


def _with_placeholders(inputs, token: int, count: int = 4) -> dict:
    """``inputs`` with ``count`` text tokens of every row before the generation prompt replaced by ``token``
    (processor outputs keep marking them as text: ``mm_token_type_ids`` 0)."""
    ids = inputs["input_ids"].clone()
    ids[:, -4 - count:-4] = token
    return {**inputs, "input_ids": ids}


@pytest.mark.parametrize(("family", "token"), [*((f, "video_token_id") for f in VIDEO_FAMILIES),
                                               *((f, "image_token_id") for f in FAMILIES)])
def test_placeholders_without_their_visual_inputs_are_text_as_for_the_unwrapped_model(built, family, token):
    """transformers embeds a placeholder of a modality the call brings no inputs for as an ordinary token (its own
    LLaVA-OneVision tests build such input_ids): the wrapped model runs exactly as the unwrapped one."""
    model, processor = built(family)
    inputs = _with_placeholders(make_inputs(processor, None), getattr(model.config, token))
    reference = greedy(model, inputs, steps=4)
    prune_wrap(model, ratio=0.25, scorer="attention")
    out = greedy(model, inputs, steps=4)
    assert model.tokenprune.last_stats is None  # no visual tokens: nothing pruned
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits, strict=True))


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_placeholders_beside_images_without_videos_are_text(built, family):
    """Images given, video placeholders but no video: the images are pruned as without the stray tokens, which stay
    in the sequence as text (== the unpruned model with only dropped image tokens masked out)."""
    model, processor = built(family)
    inputs = _with_placeholders(make_inputs(processor, "image"), model.config.video_token_id)
    images = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    prune_wrap(model, ratio=0.25, scorer="attention")

    def assert_masked_reference(inputs: dict) -> None:
        pruned = greedy(model, inputs, steps=4)
        stats = model.tokenprune.last_stats
        assert stats.visual_tokens_before == images
        drop = drop_mask(inputs["input_ids"], (model.config.image_token_id,), stats)
        reference = generate_reference(model, inputs, drop, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                       output_logits=True, return_dict_in_generate=True)
        assert torch.equal(pruned.sequences, reference.sequences)
        assert max((a - b).abs().max().item() for a, b in zip(pruned.logits, reference.logits, strict=True)) < 1e-4

    assert_masked_reference(inputs)
    if "mm_token_type_ids" in inputs:  # typed as video tokens: Qwen's get_rope_index needs a video grid (its error);
        # Gemma 4 makes them a bidirectional block of text embeddings, which pruning keeps
        types = inputs["mm_token_type_ids"].clone()
        types[inputs["input_ids"] == model.config.video_token_id] = 2
        typed = {**inputs, "mm_token_type_ids": types}
        errors = [_generate_error(model, typed)]
        with model.tokenprune.disabled():
            errors.append(_generate_error(model, typed))
        assert type(errors[0]) is type(errors[1]) and str(errors[0]) == str(errors[1])
        assert (errors[0] is None) == (family == "gemma4")
        if errors[0] is None:
            assert_masked_reference(typed)
