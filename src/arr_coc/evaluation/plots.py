"""The evaluation's picture: accuracy against the visual tokens really used, one panel per task, every method."""

from __future__ import annotations

import math

from .methods import REGISTRY


def token_ticks(low: float, high: float) -> list[int]:
    """Tick values for a log axis of visual tokens from ``low`` to ``high``: the powers of two between them; where
    fewer than two are, the two ends (rounded) join them unless they sit within a quarter of one – so the labels
    are few and never crowd each other."""
    low, high = max(low, 1.0), max(high, 1.0)
    ticks = [2**k for k in range(0, 20) if low <= 2**k <= high]
    if len(ticks) < 2:
        ends = {round(low), round(high)}
        ticks += [v for v in ends if all(max(v, t) / min(v, t) > 1.25 for t in ticks)]
    return sorted(set(ticks))


def accuracy_plot(rows: list[dict], title: str):
    """Exact match against mean visual tokens used per method (``full`` as a star), one panel per task, each with
    its own legend, readable ticks and its n; ``title`` (the model and the data) above. Rows: `EvalResult.table`."""
    from matplotlib.ticker import FixedLocator, NullFormatter, StrMethodFormatter

    from ..figures import new_figure

    tasks = sorted({r["task"] for r in rows})
    fig, axes = new_figure(6.2 * len(tasks), 5.6, 1, len(tasks))
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task]
        for method in REGISTRY:
            pts = sorted((r["tokens_used"], r["exact_match"]) for r in mine if r["method"] == method)
            if pts:
                xs, ys = zip(*pts)
                full = method == "full"
                ax.plot(xs, ys, marker="*" if full else "o", markersize=10 if full else 4,
                        linestyle="none" if full else "-", label=method)  # fmt: skip
        used = [r["tokens_used"] for r in mine if not math.isnan(r["tokens_used"])]
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(token_ticks(min(used), max(used))))
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("visual tokens used per image (mean, log scale)")
        ax.set_ylabel("exact match")
        ax.set_ylim(-0.03, 1.03)
        n = max(r["n"] for r in mine)
        ax.set_title(f"{task} (n = {n} samples)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    fig.suptitle(title, fontsize=11)
    return fig


def plot_accuracy(rows: list[dict], path: str, title: str = "arr-coc evaluation") -> None:
    """`accuracy_plot` written to ``path`` (PNG)."""
    accuracy_plot(rows, title).savefig(path, dpi=110)
