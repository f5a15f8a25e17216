"""Label generation: resume after a kill, multi-process sharding, judges and failures, loaders, stored tensors."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
from conftest import free_port

from hf_tokenprune import prune_wrap, score_inputs, tiny
from hf_tokenprune.explain import visual_relevance
from hf_tokenprune.training.labels import (
    LabelSample,
    build_prompt,
    exact_match,
    from_dataset,
    generate_labels,
    label_from_paths,
    load_jsonl,
    normalized_match,
    sample_from_dict,
)
from hf_tokenprune.training.store import LabelWriter, _shard_info, read_index, read_labels

STEPS = 4  # max_new_tokens: short answers keep the relevance passes cheap
ROOT = Path(__file__).resolve().parents[1]


def not_wrong(prediction: str, reference: str) -> bool:
    """Accepts the random model's gibberish unless the reference is "wrong"."""
    return reference != "wrong"


def predict(model, processor, sample: LabelSample) -> tuple[str, torch.Tensor]:
    """The model's greedy answer text and its token ids up to the first eos."""
    inputs = build_prompt(processor, sample)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    eos = torch.isin(generated, torch.tensor(model.generation_config.eos_token_id)).nonzero()
    answer = generated[: int(eos[0]) if len(eos) else len(generated)]
    return processor.decode(answer, skip_special_tokens=True).strip(), answer


def write_jsonl(directory: Path, count: int, answers=None) -> Path:
    """``count`` samples as JSONL with images (and one video) under ``directory/media``; every third answer is
    "wrong", the others ``answers[i]`` (default "yes"); sample 1 has no id (derived: ``00000001``)."""
    (directory / "media").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        row = {"id": f"s{i:02d}", "question": "what colour is the circle ?",
               "answer": "wrong" if i % 3 == 2 else (answers[i] if answers else "yes")}
        if i == 1:
            del row["id"]
        if i == 4:
            frames = [f"media/v{i}-{t}.png" for t in range(4)]
            for path, frame in zip(frames, tiny.make_video(i, frames=4, size=56)):
                frame.save(directory / path)
            row["video"] = frames
        else:
            tiny.make_image(i, size=56).save(directory / f"media/{i}.png")
            row["image"] = f"media/{i}.png"
        rows.append(row)
    path = directory / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def assert_same_labels(a: Path, b: Path) -> None:
    """Same kept ids (no duplicates), bit-identical tensors, same meta and the same skips."""
    left, right = read_labels(a), read_labels(b)
    assert [r.sample_id for r in left] == [r.sample_id for r in right]
    assert len({r.sample_id for r in left}) == len(left)
    for x, y in zip(left, right):
        for name in ("feature", "relevance", "grid"):
            assert torch.equal(getattr(x, name), getattr(y, name)), (x.sample_id, name)
        assert x.meta == y.meta
    assert read_index(a)["counts"] == read_index(b)["counts"]


@pytest.fixture(scope="module")
def qwen(built):
    return built("qwen2_vl")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data"), 7)


@pytest.fixture(scope="module")
def reference(qwen, data, tmp_path_factory) -> Path:
    """An uninterrupted single-process run over ``data``."""
    out = tmp_path_factory.mktemp("reference")
    summary = generate_labels(*qwen, load_jsonl(data), out, judge=not_wrong, max_new_tokens=STEPS, shard_size=2,
                              progress=False)
    assert (summary.labels_added, summary.dropped, summary.failed, summary.labels_total) == (5, 2, 0, 5)
    return out


@pytest.mark.parametrize("flush_on_exit", [True, False], ids=["interrupt", "hard-kill"])
def test_resume_after_kill(qwen, data, reference, tmp_path, monkeypatch, flush_on_exit):
    """A run stopped after 3 samples, then rerun, ends with exactly the uninterrupted run's labels. "interrupt":
    KeyboardInterrupt, the writer commits what it buffered on the way out; "hard-kill": as after SIGKILL, only the
    shards committed before the kill exist (the writer's close is a no-op)."""
    calls = []

    @functools.wraps(not_wrong)  # the same judge name in the header, or the rerun would refuse the directory
    def interrupting(prediction: str, reference: str) -> bool:
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return not_wrong(prediction, reference)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        if not flush_on_exit:
            patch.setattr(LabelWriter, "close", lambda self: None)
        generate_labels(*qwen, load_jsonl(data), tmp_path, judge=interrupting, max_new_tokens=STEPS, shard_size=2,
                        progress=False)
    assert not (tmp_path / "index.json").exists()
    summary = generate_labels(*qwen, load_jsonl(data), tmp_path, judge=not_wrong, max_new_tokens=STEPS,
                              shard_size=2, progress=False)
    # committed before the stop: the shard of the first 2 kept samples, + the dropped 3rd when flushed on exit
    done = 3 if flush_on_exit else 2
    # the first 2 samples (kept) were committed before the stop: the rerun adds the other 3 labels, 5 are there
    assert {k: v for k, v in summary.to_dict().items() if "seconds" not in k} == {
        "labels_added": 3, "dropped": 7 - done - 3, "failed": 0, "already_done": done, "labels_total": 5}
    assert_same_labels(reference, tmp_path)


@pytest.mark.parametrize("launcher", [["--multi_gpu", "--num_processes", "2"], ["--cpu", "--num_processes", "2"]],
                         ids=["torchrun-2-processes", "cpu-flag"])
def test_accelerate_launch_equals_single_process(qwen, tmp_path, launcher):
    """``--multi_gpu`` starts 2 processes through torchrun (gloo on CPU); accelerate's ``--cpu`` alone starts ONE
    process (multi-CPU needs MPI) and must still label everything. Bit-identical to one process with the same
    thread count (other thread counts change float reduction order: relevance then differs by ~1e-7 relative)."""
    model, processor = qwen
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    samples = load_jsonl(write_jsonl(tmp_path / "probe", 7))
    answers = [predict(model, processor, samples[i])[0] for i in range(len(samples))]
    jsonl = write_jsonl(tmp_path / "data", 7, answers)  # correct answers, except every third ("wrong")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes (OMP_NUM_THREADS=1): the same float reduction order
    try:
        single = label_from_paths(str(tmp_path / "model"), str(jsonl), tmp_path / "single", max_new_tokens=STEPS,
                                  shard_size=2, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert (single.labels_added, single.dropped) == (5, 2)
    port = free_port()  # not accelerate's default port 29500: other launches may run beside this one
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_machines", "1",
               "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "hf_tokenprune.cli", "label",
               "--model", str(tmp_path / "model"), "--data", str(jsonl), "--out", str(tmp_path / "launched"),
               "--max-new-tokens", str(STEPS), "--shard-size", "2"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["labels_added"], summary["dropped"], summary["failed"], summary["labels_total"]) == (5, 2, 0, 5)
    ranks = {p.name.split("-")[1] for p in (tmp_path / "launched").glob("labels-*.safetensors")}
    assert ranks == ({"r000", "r001"} if "--multi_gpu" in launcher else {"r000"})
    assert_same_labels(tmp_path / "single", tmp_path / "launched")


def test_judges_counts_and_failures(qwen, tmp_path):
    model, processor = qwen
    rows = [{"question": "what colour is the circle ?", "image": tiny.make_image(i, size=56)} for i in range(5)]
    for i, row in enumerate(rows):
        prediction = predict(model, processor, LabelSample(str(i), row["question"], "", images=[row["image"]]))[0]
        row["answer"] = prediction.upper() + " !" if i % 2 == 0 else "wrong"  # case/punctuation differ
    rows.insert(2, {"question": "what is it ?", "answer": "x", "image": "no/such/file.png"})
    summary = generate_labels(model, processor, iter(rows), tmp_path, max_new_tokens=STEPS, progress=False)
    assert (summary.labels_added, summary.dropped, summary.failed, summary.already_done) == (3, 2, 1, 0)
    assert summary.seconds > 0 and summary.seconds_per_label == pytest.approx(summary.seconds / 3)
    counts = read_index(tmp_path)["counts"]
    assert counts["kept"] == 3 and counts["skip_reasons"] == {"incorrect": 2, "failed: FileNotFoundError": 1}
    kept = read_labels(tmp_path)
    assert [r.sample_id for r in kept] == ["00000000", "00000003", "00000005"]  # ids: the row index
    assert all(normalized_match(r.meta["prediction"], r.meta["reference"]) for r in kept)
    assert not any(exact_match(r.meta["prediction"], r.meta["reference"]) for r in kept)

    exact = generate_labels(model, processor, rows, tmp_path / "exact", judge=exact_match, max_new_tokens=STEPS,
                            progress=False)
    assert (exact.labels_added, exact.dropped, exact.failed) == (0, 5, 1) and exact.seconds_per_label is None


def test_judges():
    assert normalized_match("The  Red, circle!", "the red circle") and not exact_match("The red", "the red")
    assert exact_match(" red\n", "red") and not normalized_match("red", "blue")


def test_fail_fast_on_a_broken_setup(qwen, tmp_path):
    """The first samples all failing stops the run and records nothing (a fixed rerun retries them); failures
    after a success are recorded."""
    samples = [LabelSample(f"s{i}", "what colour is the circle ?", "yes", images=[tiny.make_image(i, size=56)])
               for i in range(4)]

    def broken(prediction: str, reference: str) -> bool:
        raise AttributeError("broken judge")

    with pytest.raises(RuntimeError, match="first 2 samples all failed.*broken judge"):
        generate_labels(*qwen, samples, tmp_path, judge=broken, max_new_tokens=STEPS, fail_fast=2, progress=False)
    assert not list(tmp_path.glob("labels-*"))

    calls = []

    def flaky(prediction: str, reference: str) -> bool:
        calls.append(1)
        if len(calls) in (1, 3):
            raise AttributeError("flaky judge")
        return True

    summary = generate_labels(*qwen, samples, tmp_path, judge=flaky, max_new_tokens=STEPS, fail_fast=2,
                              progress=False)
    assert (summary.labels_added, summary.failed) == (2, 2)
    assert read_index(tmp_path)["counts"]["skip_reasons"] == {"failed: AttributeError": 2}


def test_box_labels_need_boxes_that_hit_a_token(qwen, tmp_path):
    """``relevance="boxes"``: samples without evidence boxes, or with boxes outside the image, fail with the
    reason; an unknown source is refused before any work. (Box labels themselves: tests/test_world.py.)"""
    image = tiny.make_image(0, size=56)
    samples = [LabelSample("none", "what colour is the circle ?", "yes", images=[image]),
               LabelSample("outside", "what colour is the circle ?", "yes", images=[image],
                           meta={"boxes": [[0, 60, 60, 70, 70]]}),
               LabelSample("inside", "what colour is the circle ?", "yes", images=[image],
                           meta={"boxes": [[0, 0, 0, 8, 8]]})]
    with pytest.raises(ValueError, match="relevance must be one of"):
        generate_labels(*qwen, samples, tmp_path, relevance="box", progress=False)
    summary = generate_labels(*qwen, samples, tmp_path, judge=not_wrong, max_new_tokens=STEPS, relevance="boxes",
                              progress=False)
    assert (summary.labels_added, summary.failed) == (1, 2)
    (shard,) = tmp_path.glob("labels-*.safetensors")
    errors = {sample_id: meta["error"] for sample_id, _, meta in _shard_info(shard)["skips"]}
    assert "no evidence boxes" in errors["none"] and "no visual token overlaps" in errors["outside"]
    (record,) = read_labels(tmp_path)
    assert record.relevance.sum().item() == pytest.approx(1.0) and 0 < int((record.relevance > 0).sum()) < 8
    assert read_index(tmp_path)["header"]["relevance"] == "boxes"


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_stored_tensors_equal_direct_computation(built, family, data, tmp_path):
    """JSONL with relative paths (image and video samples): the stored feature is ``score_inputs``'s A^0_v and
    the relevance ``visual_relevance`` of the generated answer, computed directly."""
    model, processor = built(family)
    samples = load_jsonl(data)
    summary = generate_labels(model, processor, samples, tmp_path, judge=not_wrong, max_new_tokens=STEPS,
                              progress=False, limit=5)
    assert (summary.labels_added, summary.dropped) == (4, 1)
    records = {r.sample_id: r for r in read_labels(tmp_path)}
    assert sorted(records) == ["00000001", "s00", "s03", "s04"]
    for index, sample_id in [(0, "s00"), (4, "s04")]:  # an image, a video
        sample, record = samples[index], records[sample_id]
        inputs = build_prompt(processor, sample)
        found = score_inputs(model, inputs)
        prediction, answer = predict(model, processor, sample)
        assert torch.equal(record.feature, found.first_layer_attention[0, found.valid[0]])
        assert torch.equal(record.relevance, visual_relevance(model, inputs, answer))
        assert record.meta["prediction"] == prediction and record.meta["question"] == sample.question
        if family == "qwen2_vl":  # 56x56 px: 4x4 merged tokens per image / per 2 video frames
            assert record.grid.tolist() == ([[1, 4, 4]] if index == 0 else [[2, 4, 4]])
        else:
            assert record.grid.tolist() == [[n] for n in found.layout.segments[0]]


def test_wrapped_model_labels_unpruned(qwen, data, reference, tmp_path):
    model, processor = qwen
    prune_wrap(model, ratio=0.25, scorer="attention", scope="image")
    generate_labels(model, processor, load_jsonl(data), tmp_path, judge=not_wrong, max_new_tokens=STEPS,
                    shard_size=2, progress=False)
    assert_same_labels(reference, tmp_path)


def test_dataset_loader(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [tiny.make_image(i, size=56) for i in range(2)]
    dataset = datasets.Dataset.from_dict({"q": ["what ?", "which ?"], "answer": ["red", "blue"], "picture": images})
    samples = from_dataset(dataset.cast_column("picture", datasets.Image()), columns={"question": "q",
                                                                                      "image": "picture"})
    assert len(samples) == 2
    sample = samples[1]
    assert (sample.sample_id, sample.question, sample.answer, sample.video) == ("00000001", "which ?", "blue", None)
    assert numpy.array_equal(numpy.asarray(sample.images[0].convert("RGB")), numpy.asarray(images[1]))


def test_sample_from_dict(tmp_path):
    tiny.make_image(0, size=56).save(tmp_path / "a.png")
    image = tiny.make_image(1, size=56)
    sample = sample_from_dict({"id": 7, "question": "q", "answer": 3, "images": "a.png", "image": image,
                               "meta": {"source": "x"}}, 5, base_dir=tmp_path)
    assert (sample.sample_id, sample.answer, sample.meta, sample.video) == ("7", "3", {"source": "x"}, None)
    assert len(sample.images) == 2 and sample.images[1] is image and sample.images[0].size == (56, 56)
    assert sample_from_dict({"question": "q", "answer": "a", "video": [image, image]}, 12).sample_id == "00000012"


def test_head_feature_from_existing_labels(qwen, data, reference, tmp_path):
    """``relevance_from``: the per-head feature for an existing label directory's samples, without generation or
    gradients: same ids, ``R_v``, grid and meta, the feature ``[heads, N_v]`` whose head mean is the stored A^0_v;
    samples without a label there are skipped; the header keeps the source's relevance settings."""
    model, processor = qwen

    def never(prediction: str, reference: str) -> bool:  # the judge must not run: nothing is generated
        raise AssertionError("judged")

    summary = generate_labels(model, processor, load_jsonl(data), tmp_path, judge=never, progress=False,
                              feature="first_layer_head_attention", relevance_from=reference)
    assert (summary.labels_added, summary.dropped, summary.failed) == (5, 2, 0)
    source, heads = read_labels(reference), read_labels(tmp_path)
    assert [r.sample_id for r in heads] == [r.sample_id for r in source]
    n_heads = model.config.text_config.num_attention_heads
    for old, new in zip(source, heads, strict=True):
        assert new.feature.shape == (n_heads, *old.feature.shape)
        assert torch.allclose(new.feature.mean(dim=0), old.feature, atol=1e-7)
        assert torch.equal(new.relevance, old.relevance) and torch.equal(new.grid, old.grid)
        assert new.meta == old.meta
    header, old_header = read_index(tmp_path)["header"], read_index(reference)["header"]
    assert header["feature"] == "first_layer_head_attention" and header["relevance_from"] == str(reference)
    assert {k: header[k] for k in ("relevance", "aggregation", "judge", "max_new_tokens")} == {
        k: old_header[k] for k in ("relevance", "aggregation", "judge", "max_new_tokens")}
    assert read_index(tmp_path)["counts"]["skip_reasons"] == {"no label in relevance_from": 2}


def test_relevance_from_another_model_is_refused(built, reference, data, tmp_path):
    model, processor = built("llava_onevision")
    with pytest.raises(ValueError, match="labels a 'qwen2_vl' model, this one is 'llava_onevision'"):
        generate_labels(model, processor, load_jsonl(data), tmp_path, progress=False, relevance_from=reference)
    with pytest.raises(ValueError, match="relevance_from and the output are the same directory"):
        generate_labels(model, processor, load_jsonl(data), reference, progress=False, relevance_from=reference)
    with pytest.raises(ValueError, match="feature must be one of"):
        generate_labels(model, processor, load_jsonl(data), tmp_path, progress=False, feature="heads")
