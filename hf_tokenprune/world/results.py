"""The toy world's results: ``python -m hf_tokenprune.world.results --out docs/`` (:func:`evaluate` takes any model
that answers world questions; the real-LM testbed uses it too).

On the shipped world models and held-out questions (every question kind by default), for every method (compressor,
raw first-layer attention, the oracle ``R_v``, random, uniform; the set selections DivPrune, CDPruner and
compressor+dpp; the FastV / PDrop / DART / ToMe baselines) at every fixed retention (50 / 25 / 12.5 / 6.25%), and
for the compressor with the dynamic budget (``budget="auto"``) at a mean retention of 25%, 12.5% and 6.25%: the
temperature of its relevance distribution chosen by accuracy on other held-out scenes (:func:`_select_temperature`),
the threshold calibrated on the scores of the evaluated questions (no answers: a dataset-level mean retention, so
the comparison with the fixed ratio is at equal retention), and, as shipped, the threshold of the calibration scenes
(its retention and accuracy here):

* **accuracy** of the pruned model's greedy answer (through ``generate``, as users run it), overall and per
  question kind;
* **retention**: the achieved mean fraction of visual tokens kept (per sample, then averaged); for the in-LLM
  methods (FastV, PDrop, DART), which let every visual token into the LLM, the configured ratio;
* **answer region kept**: share of questions where at least one kept token overlaps the answer's box;
* **pointing**: share of questions whose highest-scored token overlaps the answer's box (oracle ``R_v``,
  compressor ``R~_v``, attention ``A^0_v``).

The oracle ``R_v`` is the gradient-weighted relevance of the reference answer (teacher forced): an upper
bound that needs the answer, not a pruning method. Writes ``world_results.json``, ``world_results.md`` and
``world_accuracy.png`` (accuracy vs mean retention; matplotlib, if installed); ``--add`` adds rows to the
``world_results.json`` already there (same held-out questions) instead of starting a new one.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters import get_adapter
from ..calibrate import calibrate
from ..config import COMPRESSOR_SCORERS, LAYER_SCORERS
from ..explain import visual_relevance
from ..scorers import OracleScorer
from ..wrap import prune_wrap, score_inputs, unwrap
from . import compressor_path, load
from .evaluate import heldout_samples, inputs_for, predict, score_answers
from .evidence import answer_tokens
from .scenes import KINDS, Sample

SCORERS = ("compressor", "attention", "oracle", "random", "uniform", "divprune", "cdpruner", "compressor+dpp", "fastv",
           "pdrop", "dart", "tome")
RATIOS = (1.0, 0.5, 0.25, 0.125, 0.0625)
AUTO_SCORERS = ("compressor",)  # methods also run with budget="auto", calibrated to each of TARGETS
TARGETS = (0.25, 0.125, 0.0625)
TEMPERATURES = (1.0, 0.5, 0.3, 0.2)  # candidates of budget="auto"; the first wins ties
SELECTION_TOLERANCE = 0.01  # a temperature whose calibrated retention misses the target by more is not a candidate
SATURATED_MASS = 1 - 1e-6  # nor one whose threshold reaches this: the float64 underflow of the tail sets its budget
CALIBRATION_START = 100_000  # held-out scenes from this index on calibrate the threshold (evaluation: from 0)


def per_sample(model, processor, samples: list[Sample], compressor: str | None) -> list[dict]:
    """Oracle relevance, first-layer attention, compressor relevance and answer tokens of every sample."""
    adapter = get_adapter(model)
    scorer = None
    if compressor is not None:
        from ..config import TokenPruneConfig
        from ..methods import build_scorer

        scorer = build_scorer(TokenPruneConfig(scorer="compressor", compressor=compressor), adapter)
    out = []
    for s in tqdm(samples, desc="oracle relevance"):
        inputs = inputs_for(processor, [s])
        answer = torch.tensor(processor.tokenizer(s.question.answer, add_special_tokens=False)["input_ids"])
        found = score_inputs(model, inputs)
        n = found.layout.counts[0]
        row = {"oracle": visual_relevance(model, inputs, answer), "attention": found.first_layer_attention[0, :n]}
        if scorer is not None:
            with torch.no_grad():
                row["compressor"] = scorer.score(found)[0, :n].float()
        sizes = None if s.is_video else [s.media.size]
        row["answer_tokens"] = answer_tokens(adapter.token_regions(inputs, 0, original_sizes=sizes), s)
        out.append(row)
    return out


def _run(model, processor, samples: list[Sample], rows: list[dict] | None, batch_size: int, label: str) -> dict:
    """Answers of the wrapped ``model`` to ``samples``: accuracy (overall, per kind), answer region kept (with the
    samples' ``rows`` from :func:`per_sample`, else None), and the mean of every sample's retention
    (:attr:`~hf_tokenprune.PruneStats.retention`)."""
    answers, kept_region, retention, flops = [], [], [], []
    for i in tqdm(range(0, len(samples), batch_size), desc=label, leave=False):
        if isinstance(model.tokenprune.scorer, OracleScorer):
            model.tokenprune.scorer.values = [r["oracle"] for r in rows[i:i + batch_size]]
        answers += predict(model, processor, samples[i:i + batch_size], batch_size)
        # stats of the last generate call = this chunk's prefill (predict runs one call per chunk)
        stats = model.tokenprune.last_stats
        if rows:
            for r, kept in zip(rows[i:i + batch_size], stats.kept_indices, strict=True):
                kept_region.append(bool(r["answer_tokens"][kept].any()))
        retention += stats.retention
        flops += [stats.prefill_flops_ratio] * len(stats.retention)
    scored = score_answers(samples, answers)
    by_kind: dict[str, list[float]] = {}
    for s, kept in zip(samples, retention, strict=True):
        by_kind.setdefault(s.question.kind, []).append(kept)
    return {"accuracy": scored["accuracy"], "per_kind": scored["per_kind"],
            "answer_region_kept": sum(kept_region) / len(kept_region) if rows else None,
            "retention": sum(retention) / len(retention), "prefill_flops": sum(flops) / len(flops),
            "retention_per_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}}


def _record(result: dict, name: str, key: str, measured: dict) -> None:
    for field in ("accuracy", "per_kind", "answer_region_kept", "retention", "retention_per_kind", "prefill_flops"):
        if field in measured:
            result[field].setdefault(name, {})[key] = measured[field]


def shipped_compressor(family: str) -> str | None:
    """The shipped compressor directory of world model ``family``, None if it has none."""
    try:
        return str(compressor_path(family))
    except FileNotFoundError:
        return None


def evaluate(model, processor, samples: list[Sample], *, label: str, compressor: str | None,
             batch_size: int = 32, scorers=SCORERS, ratios=RATIOS, auto_scorers=AUTO_SCORERS, targets=TARGETS,
             temperatures=TEMPERATURES, calibration: list[Sample] | None = None) -> dict:
    """For one model (``label``: in progress bars) and one set of samples: accuracy (overall and per question kind),
    answer region kept, achieved mean retention and prefill-FLOP ratio of every scorer at every fixed ratio and, for
    ``auto_scorers``, of ``budget="auto"`` at each mean retention of ``targets`` (temperature chosen on the
    ``calibration`` questions, :func:`_select_temperature`; threshold calibrated on the scores of ``samples``; and
    the transfer of the ``calibration`` threshold); and pointing. ``compressor``: its directory (None: the
    compressor-based methods are left out)."""
    if compressor is None:
        scorers = [s for s in scorers if s not in COMPRESSOR_SCORERS]
        auto_scorers = [s for s in auto_scorers if s not in COMPRESSOR_SCORERS]
    rows = per_sample(model, processor, samples, compressor)
    result: dict = {"n": len(samples), "pointing": {}, "accuracy": {}, "per_kind": {}, "answer_region_kept": {},
                    "retention": {}, "retention_per_kind": {}, "prefill_flops": {}, "calibration": {}}
    for name in ("oracle", "compressor", "attention"):
        if name in rows[0]:
            hits = [bool(r["answer_tokens"][int(r[name].argmax())]) for r in rows]
            result["pointing"][name] = sum(hits) / len(hits)
    full = score_answers(samples, predict(model, processor, samples, batch_size))
    result["accuracy"]["full"], result["per_kind"]["full"] = {"1.0": full["accuracy"]}, {"1.0": full["per_kind"]}
    result["retention"]["full"] = result["prefill_flops"]["full"] = {"1.0": 1.0}
    for name in scorers:
        for ratio in [r for r in ratios if r < 1.0]:
            scorer = OracleScorer() if name == "oracle" else name
            prune_wrap(model, ratio=ratio, scorer=scorer,
                       compressor=compressor if name in COMPRESSOR_SCORERS else None)
            measured = _run(model, processor, samples, rows, batch_size, f"{label} {name} {ratio}")
            if name in LAYER_SCORERS:  # every visual token enters the LLM; its last stage keeps less than `ratio`
                measured["retention"] = ratio
                measured["retention_per_kind"] = dict.fromkeys(measured["retention_per_kind"], ratio)
            _record(result, name, str(ratio), measured)
            unwrap(model)
    # processor outputs built once: every scorer, target and temperature calibrates on the same batches
    evaluated = _batches(processor, samples, batch_size)
    calibrating = _batches(processor, calibration or [], batch_size)
    for name in auto_scorers if calibration else ():
        scoring = dict(scorer=name, compressor=compressor if name in COMPRESSOR_SCORERS else None)
        for target in targets:
            key = str(target)
            temperature, selection = _select_temperature(model, processor, calibration, calibrating, target,
                                                         temperatures, batch_size, scoring)
            # the threshold for a mean of `target` over the evaluated questions, from their scores alone
            own = calibrate(model, evaluated, target, temperature=temperature, **scoring)
            prune_wrap(model, budget="auto", mass=own.mass, temperature=temperature, **scoring)
            _record(result, f"{name}-auto", key, _run(model, processor, samples, rows, batch_size,
                                                      f"{label} {name} auto {target}"))
            # the threshold of the calibration questions, as a user ships it: what it keeps here
            prune_wrap(model, budget="auto", mass=selection[f"{temperature:g}"]["mass"], temperature=temperature,
                       **scoring)
            shipped = _run(model, processor, samples, None, batch_size, f"{label} {name} auto {target} transfer")
            unwrap(model)
            result["calibration"].setdefault(f"{name}-auto", {})[key] = {
                **own.to_dict(), "selection": selection,
                "transfer": {k: shipped[k] for k in ("accuracy", "retention", "retention_per_kind")}}
    return result


def _select_temperature(model, processor, calibration: list[Sample], batches: list[dict], target: float,
                        temperatures, batch_size: int, scoring: dict) -> tuple[float, dict]:
    """The temperature (of ``temperatures``) of ``budget="auto"`` (``scoring``: its scorer) whose threshold,
    calibrated to ``target`` on the ``calibration`` questions (``batches``: their processor outputs), answers them
    best, among those whose threshold stays below :data:`SATURATED_MASS` (a sharp distribution's tail underflows
    float64, and the count no longer follows the threshold) and whose retention is within
    :data:`SELECTION_TOLERANCE` of ``target`` (none such: the one nearest ``target``); and per temperature that
    threshold, retention and accuracy (None: not a candidate)."""
    candidates, selection = [], {}
    for temperature in temperatures:
        calibrated = calibrate(model, batches, target, temperature=temperature, **scoring)
        eligible = abs(calibrated.retention - target) <= SELECTION_TOLERANCE and calibrated.mass < SATURATED_MASS
        accuracy = None
        if eligible:
            prune_wrap(model, budget="auto", mass=calibrated.mass, temperature=temperature, **scoring)
            accuracy = _run(model, processor, calibration, None, batch_size, f"T {temperature:g}")["accuracy"]
            unwrap(model)
            candidates.append((accuracy, temperature))
        selection[f"{temperature:g}"] = {"mass": calibrated.mass, "retention": calibrated.retention,
                                        "accuracy": accuracy}
    if not candidates:
        return min(temperatures, key=lambda t: abs(selection[f"{t:g}"]["retention"] - target)), selection
    best = max(accuracy for accuracy, _ in candidates)
    return next(t for accuracy, t in candidates if accuracy == best), selection


def _batches(processor, samples: list[Sample], batch_size: int) -> list[dict]:
    return [inputs_for(processor, samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


def add_rows(results: dict, added: dict) -> dict:
    """``results`` with the rows of ``added`` (same settings and held-out questions: a second run of this module with
    other methods) added or replacing those of the same name; the full model's rows must agree, else ValueError."""
    for setting, new in added["settings"].items():
        old = results["settings"].get(setting)
        if old is None or old["n"] != new["n"] or old["accuracy"]["full"] != new["accuracy"]["full"]:
            raise ValueError(f"{setting!r}: the results to add are not on the same held-out questions (setting, "
                             "count or full-model accuracy differ)")
        for field in ("accuracy", "per_kind", "answer_region_kept", "retention", "retention_per_kind", "pointing",
                      "prefill_flops", "calibration"):
            for name, value in new.get(field, {}).items():
                if name != "full":
                    old[field][name] = value
    return {"command": f"{results['command']}; then {added['command']}", "settings": results["settings"]}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def markdown(results: dict) -> str:
    lines = []
    for setting, r in results["settings"].items():
        fixed = [n for n in r["accuracy"] if n != "full" and not n.endswith("-auto")]
        ratios = sorted({k for n in fixed for k in r["accuracy"][n]}, key=float, reverse=True)
        flops = r.get("prefill_flops", {})  # measured since the real-LM testbed; older results lack it
        columns = [("acc", "accuracy"), ("answer kept", "answer_region_kept")]
        columns += [("prefill FLOPs", "prefill_flops")] if flops else []
        header = [f"{title} @{float(k) * 100:g}%" for title, _ in columns for k in ratios]
        lines += [f"### {setting} ({r['n']} held-out questions; full token set: "
                  f"{100 * r['accuracy']['full']['1.0']:.1f}%)", "",
                  "| " + " | ".join(["scorer", *header]) + " |", "|---" * (1 + len(header)) + "|"]
        for name in fixed:
            cells = [_pct(r[field].get(name, {}).get(k)) for _, field in columns for k in ratios]
            lines.append("| " + " | ".join([name, *cells]) + " |")
        lines += ["", "Pointing (top token overlaps the answer box): "
                  + ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["pointing"].items()), ""]
        lines += _budget_table(r, fixed)
    return "\n".join(lines)


def _budget_table(r: dict, fixed: list[str]) -> list[str]:
    """Dynamic vs fixed budget at each calibrated mean retention: accuracy overall and per question kind."""
    dynamic = [n for n in r["accuracy"] if n.endswith("-auto")]
    if not dynamic:
        return []
    kinds = sorted(r["per_kind"]["full"]["1.0"])
    lines = ["Dynamic budget (`budget=\"auto\"`: temperature T chosen on other scenes, threshold calibrated on these "
             "questions' scores to the target mean retention) beside every fixed-ratio method at that ratio; kept = "
             "achieved mean retention on these questions (in-LLM methods: the configured ratio); per question "
             "kind: accuracy (mean kept %).",
             "",
             "| target | method | kept | acc | " + " | ".join(kinds) + " |", "|---" * (4 + len(kinds)) + "|",
             f"| – | full | 100.0 | {_pct(r['accuracy']['full']['1.0'])} | "
             + " | ".join(_pct(r["per_kind"]["full"]["1.0"].get(k)) for k in kinds) + " |"]
    targets = sorted({k for n in dynamic for k in r["accuracy"][n]}, key=float, reverse=True)
    for key in targets:
        for name in [*dynamic, *fixed]:
            if key not in r["accuracy"].get(name, {}):
                continue
            per_kind, kept = r["per_kind"][name][key], r["retention_per_kind"][name][key]
            calibrated = r["calibration"].get(name, {}).get(key, {})
            label = (f"{name} (T {calibrated.get('temperature', 1.0):g}, mass {calibrated['mass']:.6g})"
                     if name in dynamic else name)
            label += " (in LLM)" if name in LAYER_SCORERS else ""
            lines.append(f"| {float(key) * 100:g}% | {label} | {_pct(r['retention'][name][key])} | "
                         f"{_pct(r['accuracy'][name][key])} | "
                         + " | ".join(f"{_pct(per_kind.get(k))} ({_pct(kept.get(k))})" for k in kinds) + " |")
    lines += ["", "Temperature T of each dynamic budget, chosen by accuracy on the calibration questions (other "
              "scenes) with the threshold calibrated there (– : not a candidate: threshold saturated at 1, or "
              "retention off the target by more than 1 point); transfer: that threshold on these questions, kept % "
              "and accuracy.", ""]
    for name in dynamic:
        for key in targets:
            calibrated = r["calibration"][name].get(key, {})
            transfer = calibrated.get("transfer")
            lines.append(f"* {name} {float(key) * 100:g}%: " + ", ".join(
                f"T {t} {_pct(v['accuracy'])}" for t, v in calibrated.get("selection", {}).items())
                + (f"; transfer: kept {_pct(transfer['retention'])}, acc {_pct(transfer['accuracy'])}"
                   if transfer else ""))
    return [*lines, ""]


def plot(results: dict, path: Path, x: str = "retention") -> bool:
    """Pareto plots, one row per setting: accuracy vs achieved mean retention (``x="prefill_flops"``: vs the mean
    measured prefill FLOPs, relative to the full model's, where in-LLM methods pay for the layers that see every
    token) of every method (fixed ratios as lines, dynamic budgets as stars), overall and then on each question
    kind (the x axis stays the mean over all questions: the budget a user pays); False if matplotlib is
    missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    settings = results["settings"]
    panels = {setting: [None, *(kinds if len(kinds := sorted(r["per_kind"]["full"]["1.0"])) > 1 else [])]
              for setting, r in settings.items()}
    columns = max(len(p) for p in panels.values())
    fig, axes = plt.subplots(len(settings), columns, figsize=(5 * columns, 4.2 * len(settings)), squeeze=False)
    for row, (setting, r) in zip(axes, settings.items(), strict=True):
        for ax in row[len(panels[setting]):]:
            ax.set_visible(False)
        for ax, kind in zip(row, panels[setting], strict=False):
            _pareto_panel(ax, r, kind, x)
            ax.set_title(textwrap.fill(setting if kind is None else f"{setting}: {kind}", 50), fontsize=9)
            if kind is None:
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _pareto_panel(ax, r: dict, kind: str | None, x: str) -> None:
    """One panel of :func:`plot`: accuracy overall (``kind`` None) or on one question kind, against ``x``."""

    def accuracy(name: str, key: str) -> float | None:
        value = r["accuracy"][name][key] if kind is None else r["per_kind"][name][key].get(kind)
        return None if value is None else 100 * value

    import matplotlib

    colours: dict[str, str] = {}
    tab20 = matplotlib.colormaps["tab20"].colors  # a colour per method (more than 10): the dark half first
    ax.set_prop_cycle(color=tab20[::2] + tab20[1::2])
    full = accuracy("full", "1.0")
    lowest = min(100 * v for n in r[x] for v in r[x][n].values())
    for name in r["accuracy"]:
        if name == "full":
            continue
        keys = sorted(r["accuracy"][name], key=float, reverse=True)
        xs = [100 * r[x][name][k] for k in keys]
        ys = [accuracy(name, k) for k in keys]
        if name.endswith("-auto"):  # in the colour of its fixed-ratio line
            ax.plot(xs, ys, marker="*", markersize=15, linestyle="none", label=f"{name} (calibrated)",
                    color=colours.get(name.removesuffix("-auto")), markeredgecolor="black")
        else:
            style = "--" if name in LAYER_SCORERS else "-"
            (line,) = ax.plot([100.0, *xs], [full, *ys], marker="o", linestyle=style,
                              label=f"{name} (in LLM)" if name in LAYER_SCORERS else name)
            colours[name] = line.get_color()
    ax.set_xscale("log", base=2)
    nominal = [t for t in (6.25, 12.5, 25, 50, 100) if lowest * 0.9 <= t]
    ax.set_xticks(nominal, [f"{t:g}" for t in nominal])
    ax.set_xlabel("mean visual tokens kept (%)" if x == "retention" else "prefill FLOPs (% of the full model's)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.grid(alpha=0.3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs")
    parser.add_argument("--images", type=int, default=300, help="held-out image questions per model")
    parser.add_argument("--videos", type=int, default=150, help="held-out video questions (Qwen2-VL)")
    parser.add_argument("--families", nargs="+", default=["qwen2_vl", "llava_onevision"])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), help="question kinds (default: all)")
    parser.add_argument("--scorers", nargs="+", default=list(SCORERS), help="fixed-ratio methods")
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS[1:]), help="fixed retentions")
    parser.add_argument("--auto", nargs="*", default=list(AUTO_SCORERS),
                        help="scorers also run with budget='auto' (none: skip the dynamic budget)")
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS),
                        help="mean retentions the dynamic budget is calibrated to")
    parser.add_argument("--temperatures", nargs="+", type=float, default=list(TEMPERATURES),
                        help="temperatures of the dynamic budget's distribution; the best on the calibration questions "
                             "is used")
    parser.add_argument("--calibration", type=int, default=100,
                        help="held-out questions (other scenes than the evaluated ones) that calibrate the threshold")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--add", action="store_true",
                        help="add these rows to the world_results.json in --out (same questions), keeping the others")
    parser.add_argument("--compressor", default=None,
                        help="compressor directory (one family; default: each family's shipped compressor)")
    args = parser.parse_args(argv)
    if args.compressor and len(args.families) != 1:
        parser.error("--compressor is for one family at a time")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = dict(batch_size=args.batch_size, scorers=args.scorers, ratios=args.ratios, auto_scorers=args.auto,
                   targets=args.targets, temperatures=args.temperatures)
    kinds = tuple(args.kinds)
    settings = {}
    for family in args.families:
        model, processor = load(family)
        options["compressor"] = args.compressor or shipped_compressor(family)
        settings[f"{family} images"] = evaluate(
            model, processor, heldout_samples(args.images, kinds=kinds), label=family,
            calibration=heldout_samples(args.calibration, start=CALIBRATION_START, kinds=kinds), **options)
        if family == "qwen2_vl" and args.videos:
            settings[f"{family} videos"] = evaluate(
                model, processor, heldout_samples(args.videos, video=True, kinds=kinds), label=family,
                calibration=heldout_samples(args.calibration, video=True, start=CALIBRATION_START, kinds=kinds),
                **options)
    given = sys.argv[1:] if argv is None else argv
    results = {"command": " ".join(["python -m hf_tokenprune.world.results", *given]), "settings": settings}
    if args.add:
        results = add_rows(json.loads((out / "world_results.json").read_text()), results)
    (out / "world_results.json").write_text(json.dumps(results, indent=2))
    (out / "world_results.md").write_text(markdown(results))
    plot(results, out / "world_accuracy.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
