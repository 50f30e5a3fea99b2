"""Where the exact match goes: one evaluation's loss, per task and budget, split into the parts that lose it.

With every visual token the backbone already misses ``1 - full``. Compressing to a budget loses more, in three
places, each measured against the next better method on the same samples:

- **language model** = full - oracle: even with the answer's box at full detail (`methods` ``oracle``), the language
  model answers worse once the rest is gist tokens – what it never saw in training;
- **allocation** = oracle - arr-coc: the trained heads put the detail elsewhere than the oracle;
- **budget** = full - arr-coc-auto, with the tokens the automatic budget used: what the default call (no budget
  given) loses.

The parts are differences of exact match on the same n samples, so each moves by 1/n per sample and can be negative
(an oracle above full: the distractors as gist help more than the lost context costs).
"""

from __future__ import annotations

import math


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``p`` measured on ``n`` samples (Wilson, 1927)."""
    if n == 0:
        return (0.0, 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _em(value: float, n: int) -> str:
    lo, hi = wilson_interval(value, n)
    return f"{value:.2f} [{lo:.2f}, {hi:.2f}]"


def loss_decomposition(rows: list[dict], budgets: list[str]) -> list[dict]:
    """Rows of an evaluation table (`EvalResult.table`) -> per task one row per budget where both ``oracle`` and
    ``arr-coc`` ran: ``{"task", "budget", "n", "full", "oracle", "arr-coc", "backbone", "language_model",
    "allocation", "tokens"}`` (exact matches and their differences; tokens: arr-coc's mean used), then one row
    ``budget="auto"`` where ``arr-coc-auto`` ran: its exact match, ``budget_loss`` = full - auto, and its tokens."""
    at = {(r["task"], r["method"], r["budget"]): r for r in rows}
    out = []
    for task in sorted({r["task"] for r in rows}):
        full = at.get((task, "full", "all"))
        if full is None:
            continue
        em = full["exact_match"]
        for b in budgets:
            oracle, heads = at.get((task, "oracle", b)), at.get((task, "arr-coc", b))
            if oracle is None or heads is None:
                continue
            out.append({
                "task": task, "budget": b, "n": full["n"], "full": em, "oracle": oracle["exact_match"],
                "arr-coc": heads["exact_match"], "backbone": 1 - em, "language_model": em - oracle["exact_match"],
                "allocation": oracle["exact_match"] - heads["exact_match"], "tokens": heads["tokens_used"],
            })  # fmt: skip
        auto = at.get((task, "arr-coc-auto", "auto"))
        if auto is not None:
            out.append({"task": task, "budget": "auto", "n": full["n"], "full": em, "arr-coc-auto": auto["exact_match"],
                        "budget_loss": em - auto["exact_match"], "backbone": 1 - em, "tokens": auto["tokens_used"],
                        "native": auto["native_tokens"]})  # fmt: skip
    return out


def decomposition_markdown(rows: list[dict], budgets: list[str]) -> list[str]:
    """`loss_decomposition` as markdown lines (none when the run had neither the oracle nor the automatic budget)."""
    parts = loss_decomposition(rows, budgets)
    if not parts:
        return []
    lines = ["Where exact match is lost (differences of exact match on the same samples; "
             "`evaluation.decomposition`): backbone = 1 − full; language model = full − oracle; allocation = "
             "oracle − arr-coc; budget = full − arr-coc-auto (the default call, no budget given). Exact matches "
             "with their 95% Wilson intervals. The oracle spends the budget on the answer's box alone (relevance 0 "
             "elsewhere), so where a larger budget's context helps, the trained heads can beat it (a negative "
             "allocation gap).", "",
             "| task | budget | full | oracle | arr-coc | backbone | language model | allocation | budget | tokens |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in parts:
        if p["budget"] == "auto":
            lines.append(f"| {p['task']} | auto (no budget given) | {_em(p['full'], p['n'])} | | "
                         f"{_em(p['arr-coc-auto'], p['n'])} | "
                         f"{p['backbone']:.2f} | | | {p['budget_loss']:+.2f} | {p['tokens']:.0f} of "
                         f"{p['native']:.0f} |")  # fmt: skip
        else:
            lines.append(f"| {p['task']} | {p['budget']} | {_em(p['full'], p['n'])} | {_em(p['oracle'], p['n'])} | "
                         f"{_em(p['arr-coc'], p['n'])} | "
                         f"{p['backbone']:.2f} | {p['language_model']:+.2f} | {p['allocation']:+.2f} | | "
                         f"{p['tokens']:.0f} |")  # fmt: skip
    return [*lines, ""]
