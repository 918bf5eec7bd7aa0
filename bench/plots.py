"""PNG plots: one per op, mode and dtype, median time per shape (log scale) and speed-up vs the
baseline measured in the same run."""

from __future__ import annotations

import sys
from pathlib import Path

from bench.results import RunResult, compact_label, group, shape_key


def write_plots(result: RunResult, out_dir: Path, prefix: str) -> list[Path]:
    """One PNG per op, mode and dtype: median time per shape (log scale) and speed-up vs baseline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("matplotlib is not installed: no plots written", file=sys.stderr)
        return []
    paths = []
    meta = result.meta
    for (op, mode, dtype), rows in group(result.rows, lambda r: (r["op"], r["mode"], r["dtype"])).items():
        info = meta.get("ops", {}).get(op, {})
        baseline = info.get("baseline", "eager")
        reference = info.get("bandwidth_reference")
        first_shape = {}
        for r in rows:
            first_shape.setdefault(shape_key(r["shape"]), r["shape"])
        shapes = list(first_shape)
        providers = list(dict.fromkeys(r["provider"] for r in rows))
        labels = [compact_label(first_shape[s], info.get("shape_columns", ())) for s in shapes]
        table = {(shape_key(r["shape"]), r["provider"]): r for r in rows}
        width = max(6.0, 0.45 * len(shapes) * max(1, len(providers)) * 0.5 + 2)
        fig, axes = plt.subplots(1, 2, figsize=(min(2 * width, 30), 4.8))
        bar_w = 0.8 / max(1, len(providers))
        for i, p in enumerate(providers):
            xs = [j + (i - (len(providers) - 1) / 2) * bar_w for j in range(len(shapes))]
            ys = [table[(s, p)]["median_ms"] if (s, p) in table else float("nan") for s in shapes]
            axes[0].bar(xs, ys, bar_w, label=p)
        axes[0].set_yscale("log")
        axes[0].set_ylabel("median ms (log)")
        axes[0].set_title(f"{op} {mode} {dtype}: time")
        speed_providers = [p for p in providers if p not in (baseline, reference)]
        sw = 0.8 / max(1, len(speed_providers))
        for i, p in enumerate(speed_providers):
            xs = [j + (i - (len(speed_providers) - 1) / 2) * sw for j in range(len(shapes))]
            ys = [(table[(s, p)].get(f"speedup_vs_{baseline}") or float("nan")) if (s, p) in table else float("nan")
                  for s in shapes]
            axes[1].bar(xs, ys, sw, label=p, color=f"C{providers.index(p)}")
        axes[1].axhline(1.0, color="black", linewidth=0.8)
        axes[1].set_yscale("log")
        axes[1].set_ylabel(f"speed-up vs {baseline} (×)")
        axes[1].set_title(f"{op} {mode} {dtype}: speed-up (same run)")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        for ax in axes:
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(labels, rotation=60 if len(shapes) > 4 else 0, ha="right" if len(shapes) > 4 else "center",
                               fontsize=7)
            ax.legend(fontsize=7)
            ax.grid(axis="y", alpha=0.3)
        low, high = axes[1].get_ylim()
        axes[1].set_yticks([2.0 ** k for k in range(-8, 9) if low <= 2.0 ** k <= high])
        fig.suptitle(meta.get("device_name", ""), fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{prefix}-{op}-{mode.replace('+', '_')}-{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
