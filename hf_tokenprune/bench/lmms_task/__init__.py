"""A local lmms-eval task: questions about the synthetic world's scenes, scored offline.

:func:`write_task` writes ``n`` held-out ``colour_of_shape`` questions (``test.parquet``: image, question, answer)
and the task config ``tokenprune_world.yaml`` (task ``tokenprune_world``) into a directory; lmms-eval finds the
task through ``--include_path DIR`` (``TaskManager(include_path=DIR)`` in Python). Its metric ``first_word_match``
(:func:`process_results`, the config's one Python hook) is the exact match of the generated text's first word, as
:func:`hf_tokenprune.world.evaluate.first_word` scores world questions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...world.evaluate import first_word
from ...world.scenes import make_samples

TASK = "tokenprune_world"
DATA = "test.parquet"
CONFIG = f"""\
task: {TASK}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {DATA}
test_split: test
output_type: generate_until
doc_to_visual: image
doc_to_text: question
doc_to_target: answer
process_results: !function {__name__}.process_results
generation_kwargs:
  max_new_tokens: 4
  do_sample: false
  until: []
metric_list:
  - metric: first_word_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


def write_task(out_dir: str | Path, n: int) -> Path:
    """Write ``n`` questions (test scenes ``0 .. n - 1``, 48 to 96 objects) and the task config into ``out_dir``;
    returns the config's path."""
    import datasets

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = [s for i in range(n) for s in make_samples("test", i, n_objects=(48, 96), kinds=("colour_of_shape",))]
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string")})
    columns = {"id": [s.sample_id for s in samples], "image": [s.media for s in samples],
               "question": [s.question.text for s in samples], "answer": [s.question.answer for s in samples]}
    datasets.Dataset.from_dict(columns, features=features).to_parquet(out / DATA)
    config = out / f"{TASK}.yaml"
    config.write_text(CONFIG)
    return config


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"first_word_match": float(first_word(results[0]) == doc["answer"])}
