"""Result figures (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def dice_bars(results: dict[str, dict], targets: list[str], path: Path, title: str = "") -> None:
    """Grouped bars: one group per target (and the mean), one bar per method, mean Dice with disc/cup marks."""
    cols = [*targets, "mean"]
    methods = list(results)
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(1.9 * len(cols) + 2, 4.2))
    for i, name in enumerate(methods):
        xs = [c + (i - (len(methods) - 1) / 2) * width for c in range(len(cols))]
        ax.bar(xs, [results[name][c]["dice_mean"] for c in cols], width, label=name)
        ax.scatter(xs, [results[name][c]["dice_disc"] for c in cols], marker="^", s=12, color="black", zorder=3)
        ax.scatter(xs, [results[name][c]["dice_cup"] for c in cols], marker="v", s=12, color="grey", zorder=3)
    ax.set_xticks(range(len(cols)), cols)
    lo = min(min(results[m][c]["dice_cup"], results[m][c]["dice_mean"]) for m in methods for c in cols)
    ax.set_ylim(max(0, lo - 5), 100)
    ax.set_ylabel("Dice x100 (bars: mean; ▲ disc, ▼ cup)")
    # the legend sits between the title and the axes, never over a bar
    ax.legend(fontsize=8, ncol=len(methods), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
