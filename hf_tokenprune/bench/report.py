"""Markdown tables and plots of the benchmark records (``results.md``, ``cost_<model>.png``, ``accuracy.png``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _spread(value: dict[str, float] | float) -> str:
    if isinstance(value, dict):
        return f"{value['median']:.3f} [{value['min']:.2f}–{value['max']:.2f}]"
    return f"{value:.3f}"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def cost_markdown(records: Sequence[dict[str, Any]]) -> str:
    """One table per model: every method and retention as ratios pruned / full of the same run."""
    lines: list[str] = []
    for model in dict.fromkeys(r["model"] for r in records if r["part"] == "cost"):
        rows = [r for r in records if r["part"] == "cost" and r["model"] == model]
        full = next((r for r in rows if r["method"] == "full"), None)
        if full is None:
            continue
        c, env = full["cost"], full["env"]
        lines += [f"### {model}", "", f"{full['description']}; prompt of {c['seq_len']} tokens. CPU: {env['cpu']}, "
                  f"{env['threads']} thread(s), torch {env['torch']}, transformers {env['transformers']}; "
                  f"{env['repeats']} repetitions, {env['decode_tokens']} decode tokens.", "",
                  f"Full model (medians): LLM prefill {c['llm_prefill_s']['median']:.3f} s, TTFT "
                  f"{c['ttft_s']['median']:.3f} s, decode {c['decode_tokens_per_s']['median']:.1f} tokens/s, prefill "
                  f"{c['prefill_flops'] / 1e9:.1f} GFLOP, KV cache {_mib(c['kv_bytes'])}, peak tensor memory "
                  f"{_mib(c['peak_mem_bytes'])}.", "",
                  "| method | kept | visual tokens | prefill FLOPs | LLM prefill time | TTFT | KV cache | peak memory "
                  "| decode tokens/s | scoring / full prefill |", "|---" * 10 + "|"]
        for r in sorted((r for r in rows if r["method"] != "full"), key=lambda r: (r["method"], -r["ratio"])):
            d = r["cost"]
            lines.append(f"| {r['method']} | {100 * r['ratio']:g}% | {d['visual_tokens'][0]}→{d['visual_tokens'][1]} "
                         f"| {d['prefill_flops_ratio']:.3f} | {_spread(d['prefill_time_ratio'])} | "
                         f"{_spread(d['ttft_ratio'])} | {d['kv_bytes_ratio']:.3f} | {d['peak_mem_ratio']:.3f} | "
                         f"{_spread(d['decode_speed_ratio'])} | {100 * d['scoring_overhead']:.1f}% |")
        lines.append("")
    return "\n".join(lines)


def accuracy_markdown(records: Sequence[dict[str, Any]]) -> str:
    """One table per model: accuracy (%) per method and retention."""
    lines: list[str] = []
    for model in dict.fromkeys(r["model"] for r in records if r["part"] == "accuracy"):
        rows = [r for r in records if r["part"] == "accuracy" and r["model"] == model]
        ratios = sorted({r["ratio"] for r in rows if r["method"] != "full"}, reverse=True)
        full = next((r for r in rows if r["method"] == "full"), None)
        n = full["n"] if full else rows[0].get("n")
        lines += [f"### {model} ({n} questions)", "",
                  "| method | 100% | " + " | ".join(f"{100 * x:g}%" for x in ratios) + " |",
                  "|---" * (2 + len(ratios)) + "|"]
        if full is not None:
            lines.append(f"| full | {100 * full['accuracy']:.1f} |" + " |" * len(ratios))
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "full"):
            acc = {r["ratio"]: r["accuracy"] for r in rows if r["method"] == method}
            lines.append(f"| {method} | | " + " | ".join(f"{100 * acc[x]:.1f}" if x in acc else "" for x in ratios)
                         + " |")
        lines.append("")
    return "\n".join(lines)


def plot(records: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Prefill FLOPs and time ratios vs retention per cost model, accuracy vs retention per accuracy model;
    nothing (an empty list) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    groups = {("cost", m) for m in (r["model"] for r in records if r["part"] == "cost")}
    if any(r["part"] == "accuracy" for r in records):
        groups.add(("accuracy", None))
    for part, model in sorted(groups, key=str):
        rows = [r for r in records if r["part"] == part and (model is None or r["model"] == model)]
        panels = [("prefill_flops_ratio", "prefill FLOPs / full"), ("prefill_time_ratio", "LLM prefill time / full")] \
            if part == "cost" else [(m, m) for m in dict.fromkeys(r["model"] for r in rows)]
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, (key, title) in zip(axes[0], panels, strict=True):
            for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "full"):
                mine = sorted((r for r in rows if r["method"] == method and (part == "cost" or r["model"] == key)),
                              key=lambda r: r["ratio"])
                full = next((r for r in rows if r["method"] == "full" and (part == "cost" or r["model"] == key)), None)
                start = [] if full is None else [full]  # the 100% point: the full model
                ys = [r[key] if part == "cost" else 100 * r["accuracy"] for r in mine + start]
                ax.plot([100 * r["ratio"] for r in mine + start], ys, marker="o", label=method)
            ax.set_xscale("log", base=2)
            ax.set_xticks([12.5, 25, 50, 100], ["12.5", "25", "50", "100"])
            ax.set_xlabel("visual tokens kept (%)")
            ax.set_ylabel(title if part == "cost" else "accuracy (%)")
            ax.set_title(model or key)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / (f"cost_{model}.png" if part == "cost" else "accuracy.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(records: Sequence[dict[str, Any]], out: Path) -> Path:
    """``out/results.md`` (cost and accuracy tables) and the plots; returns the markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    if any(r["part"] == "cost" for r in records):
        parts += ["## Cost (pruned / full, same process; median [min–max] over repetitions)", "",
                  cost_markdown(records)]
    if any(r["part"] == "accuracy" for r in records):
        parts += ["## Accuracy (%)", "", accuracy_markdown(records)]
    path = out / "results.md"
    path.write_text("\n".join(parts) or "No results yet.\n")
    plot(records, out)
    return path
