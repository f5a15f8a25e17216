"""Caches, torch.compile, precision of the scoring feature and accelerate dispatch with a wrapped model."""

import pytest
import torch
from conftest import FAMILIES, make_inputs
from transformers import AutoModelForImageTextToText, CompileConfig, StaticCache

from hf_tokenprune import UnsupportedGenerationError, prune_wrap, score_inputs, tiny, unwrap
from hf_tokenprune.adapters import get_adapter
from hf_tokenprune.compat import with_cache
from hf_tokenprune.verify import generate_masked_reference

GREEDY = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)


def generate(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, **{**GREEDY, **kwargs})


def same_logits(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True))


def full_graph_compile() -> CompileConfig:
    config = CompileConfig(fullgraph=True, backend="eager")  # dynamo's tracing without inductor's C++ build time
    config._compile_all_devices = True  # generate() only auto-compiles on accelerators otherwise
    return config


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_and_full_graph_compile_at_ratio_one_equal_the_unwrapped_model(built, family):
    """Fresh instances: generate() caches the compiled forward on the model."""
    inputs = make_inputs(built(family)[1], "image")
    options = dict(cache_implementation="static", compile_config=full_graph_compile())
    torch._dynamo.reset()
    reference = generate(tiny.build_model(family), inputs, **options)
    torch._dynamo.reset()
    wrapped = prune_wrap(tiny.build_model(family), ratio=1.0, scorer="attention")
    out = generate(wrapped, inputs, **options)
    assert hasattr(wrapped, "_compiled_call")
    assert torch.equal(out.sequences, reference.sequences) and same_logits(out, reference)


def _forward_calls(model) -> list:
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize(("option", "message"), [
    (dict(cache_implementation="static"), "cache_implementation='static'"),
    (dict(cache_implementation="static", compile_config=CompileConfig()), "cache_implementation='static'"),
    (dict(cache_implementation="offloaded"), "cache_implementation='offloaded'"),
    (dict(cache_implementation="offloaded_static"), "cache_implementation='offloaded_static'"),
    (dict(prefill_chunk_size=8), "prefill_chunk_size"),
    ("static cache object", "a StaticCache passed to generate"),
])
def test_unsupported_cache_options_are_refused_before_compute(built, option, message):
    model, processor = built("qwen2_vl")
    inputs = make_inputs(processor, "image")
    if option == "static cache object":
        option = with_cache(StaticCache(config=model.config, max_cache_len=256))
    prune_wrap(model, ratio=0.25, scorer="attention")
    calls = _forward_calls(model)
    with pytest.raises(UnsupportedGenerationError, match=message):
        generate(model, inputs, **option)
    assert not calls


def _outcome(model, inputs, **kwargs):
    try:
        out = generate(model, inputs, **kwargs)
    except Exception as err:  # noqa: BLE001 - the outcome compared may be transformers' own error
        return type(err), str(err)
    return out.sequences, [t.clone() for t in out.logits]


def test_offloaded_cache_at_ratio_one_behaves_like_the_unwrapped_model(built):
    """The offloaded cache needs CUDA (on CPU transformers itself fails): the wrapper changes nothing."""
    model, processor = built("qwen2_vl")
    inputs = make_inputs(processor, "image")
    reference = _outcome(model, inputs, cache_implementation="offloaded")
    prune_wrap(model, ratio=1.0, scorer="attention")
    out = _outcome(model, inputs, cache_implementation="offloaded")
    if isinstance(reference[0], type):
        assert out == reference
    else:
        assert torch.equal(out[0], reference[0]) and all(torch.equal(a, b) for a, b in zip(out[1], reference[1]))


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_compiled_forward_with_pruning_equals_masked_reference(built, family):
    """torch.compile(model.forward): the pruning hooks run as graph breaks around the compiled pieces."""
    inputs = make_inputs(built(family)[1], "image")
    model = prune_wrap(tiny.build_model(family), ratio=0.25, scorer="attention")
    eager = generate(model, inputs)
    kept = model.tokenprune.last_stats.kept_indices
    reference = generate_masked_reference(model, inputs, **GREEDY)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="eager")
    out = generate(model, inputs)
    assert all(torch.equal(a, b) for a, b in zip(model.tokenprune.last_stats.kept_indices, kept))
    assert torch.equal(out.sequences, eager.sequences) and torch.equal(out.sequences, reference.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, reference.logits)) < 1e-4


def _cpp_compiler() -> str | None:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # noqa: BLE001 - any failure to find a compiler means inductor cannot build its CPU kernels
        return None


@pytest.mark.skipif(_cpp_compiler() is None, reason="torch.compile(backend='inductor') on CPU needs a C++ compiler "
                    "(none found: install g++ or set CXX)")
def test_inductor_compiled_text_model_equals_masked_reference_and_unwrapped_model(built):
    """The LLM (the text model, which receives the pruned embeddings and original positions) compiled by inductor
    into C++ kernels: at ratio 0.25 == masked reference (same kept tokens as eager); at ratio 1.0 == the unwrapped
    model through the same compiled graphs (exactly) and == the eager model (inductor fuses: logits < 1e-5).
    One family and 3 tokens to keep the C++ build short (~35 s here)."""
    inputs = make_inputs(built("llava")[1], "image")
    options = dict(GREEDY, max_new_tokens=3, min_new_tokens=3)
    model = tiny.build_model("llava")
    plain = generate(model, inputs, **options)
    prune_wrap(model, ratio=0.25, scorer="attention")
    generate(model, inputs, **options)
    kept = model.tokenprune.last_stats.kept_indices
    reference = generate_masked_reference(model, inputs, **options)
    torch._dynamo.reset()
    text_model = get_adapter(model).text_model
    text_model.forward = torch.compile(text_model.forward, backend="inductor")  # the wrapper's hooks stay eager
    out = generate(model, inputs, **options)
    assert all(torch.equal(a, b) for a, b in zip(model.tokenprune.last_stats.kept_indices, kept, strict=True))
    assert torch.equal(out.sequences, reference.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, reference.logits)) < 1e-5
    unwrap(model)
    prune_wrap(model, ratio=1.0, scorer="attention")
    full = generate(model, inputs, **options)
    unwrap(model)
    compiled_plain = generate(model, inputs, **options)
    assert torch.equal(full.sequences, compiled_plain.sequences) and same_logits(full, compiled_plain)
    assert torch.equal(full.sequences, plain.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(full.logits, plain.logits)) < 1e-5
    torch._dynamo.reset()


# Gemma 3's random tiny SigLIP tower itself differs by ~20% between bfloat16 and float32 (its inputs_embeds by 14%)
BF16_DRIFT = {"gemma3": "the bfloat16 model's own visual features differ from the float32 model's by more than 5%"}


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.skip(reason=BF16_DRIFT[f]))
                                    if f in BF16_DRIFT else f for f in FAMILIES])
def test_first_layer_attention_is_float32_in_a_bfloat16_model(built, family):
    """Norm and q/k projections run in the model's dtype (the q/k the model itself attends with), RoPE, QK^T and
    the softmax in float32: the feature of a bfloat16 model is float32 and close to the float32 model's."""
    inputs = make_inputs(built(family)[1], "image")
    features = {}
    for dtype in (torch.float32, torch.bfloat16):
        found = score_inputs(tiny.build_model(family, dtype=dtype), inputs)
        features[dtype] = found.first_layer_attention
    assert features[torch.bfloat16].dtype == torch.float32
    scale = features[torch.float32].abs().max()
    assert (features[torch.bfloat16] - features[torch.float32]).abs().max() < 0.05 * scale


# transformers' GLM-4.5V vision embeddings pass their disk-offloaded (meta) weight to F.grid_sample: unpruned too
OFFLOAD_FAILS = {"glm4v_moe": "transformers' GLM-4.5V vision tower fails under disk offload, unpruned too",
                 "gemma4": "transformers' Gemma 4 reads the text model's embedding weight outside its module (the pad "
                           "embedding of the per-layer inputs), which disk offload leaves on the meta device, unpruned "
                           "too"}


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.skip(reason=OFFLOAD_FAILS[f]))
                                    if f in OFFLOAD_FAILS else f for f in FAMILIES])
def test_accelerate_disk_offload_prunes_like_the_model_in_memory(built, family, tmp_path):
    """device_map="auto" with a CPU budget too small for the LLM: accelerate puts it on "disk" (meta weights
    loaded by hooks on each call, layer 0 included, which the scoring feature calls). On CPU accelerate knows
    only the devices "cpu" and "disk"."""
    model, processor = built(family)
    inputs = make_inputs(processor, "image")
    prune_wrap(model, ratio=0.25, scorer="attention")
    in_memory = generate(model, inputs)
    model.save_pretrained(tmp_path / "model")
    dispatched = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": "200KB"}, offload_folder=tmp_path / "offload")
    dispatched.generation_config = model.generation_config
    assert "disk" in dispatched.hf_device_map.values()
    prune_wrap(dispatched, ratio=0.25, scorer="attention")
    out = generate(dispatched, inputs)
    assert all(torch.equal(a, b) for a, b in zip(dispatched.tokenprune.last_stats.kept_indices,
                                                 model.tokenprune.last_stats.kept_indices, strict=True))
    assert torch.equal(out.sequences, in_memory.sequences)
    reference = generate_masked_reference(dispatched, inputs, **GREEDY)
    assert torch.equal(out.sequences, reference.sequences)
