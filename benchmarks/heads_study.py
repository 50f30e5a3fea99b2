"""Where a model's heads and automatic budget stand, on held-out synthetic samples (issue 17's measurements).

Per task: exact match with every visual token; the trained heads and the oracle allocation (`data.boxes.
oracle_allocation`) at each compression of ``--budgets`` (with localisation: the answer box entirely at full
detail); the automatic budget at each ``--confidences`` (exact match, mean tokens used, their share of native);
the training-free rule's automatic budget; and the calibration of the automatic budget at the model's own
``budget_confidence`` (`evaluation.calibration`: Spearman's rho against each sample's smallest surviving budget).

    python benchmarks/heads_study.py --model runs/tiny-heads-v2 --n 50 --out runs/study_v2.json
    python benchmarks/heads_study.py --model runs/tiny-heads-v2 --n 50 --offset 1000 --confidences 0.5,0.8,0.9,0.95

``--offset`` moves to other held-out seeds (choose settings there, report on offset 0).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import arr_coc
from arr_coc.configuration_arr_coc import parse_settings
from arr_coc.data.boxes import oracle_allocation
from arr_coc.data.synthetic import TASKS, normalize_answer
from arr_coc.evaluation.calibration import measure_calibration
from arr_coc.evaluation.decomposition import wilson_interval
from arr_coc.evaluation.harness import Batch, Harness, box_covered, synthetic_samples
from arr_coc.relevance import ALL_TOKENS, RealizationRequest


def interval(hits: list[bool]) -> tuple[float, float]:
    """95% Wilson interval of the share of ``hits`` (`evaluation.decomposition.wilson_interval`)."""
    lo, hi = wilson_interval(sum(hits) / max(len(hits), 1), len(hits))
    return round(lo, 3), round(hi, 3)


@torch.no_grad()
def study(model, processor, samples: list[dict], budgets: list[float], confidences: list[float],
          batch_size: int = 8, shapings: list[tuple[int, float]] = ()) -> dict:  # fmt: skip
    """Rows per task (see the module docstring); each of ``shapings`` – (relevance_spread, relevance_floor) – adds
    the heads at every budget and the automatic budget at the model's own confidence with the allocator's input
    shaped so (`relevance.shape_relevance`), keyed ``"... [spread s, floor f]"``."""
    harness = Harness(model, processor)
    records: dict[str, list] = {}

    def add(key: str, batch: Batch, request: RealizationRequest) -> None:
        c = batch.compress(request)
        answers = harness.generate(c)
        for i, s in enumerate(batch.samples):
            records.setdefault(key, []).append({
                "task": s["task"], "right": normalize_answer(answers.texts[i]) == normalize_answer(s["answer"]),
                "tokens": int(answers.tokens_used[i]), "native": batch.natives[i],
                "localised": box_covered(answers.detail_maps[i], s["answer_box"], s["image"].size),
            })  # fmt: skip

    for start in range(0, len(samples), batch_size):
        batch = Batch(harness, samples[start : start + batch_size])
        add("full", batch, RealizationRequest(budget=ALL_TOKENS, encoding="single"))
        for r in budgets:
            add(f"heads 1/{r:g}", batch, RealizationRequest(compression=r, encoding="single", mode="trained"))
            oracle = [
                oracle_allocation(model.allocator, s["answer_box"], s["image"].size, g, math.ceil(n / r))
                for s, g, n in zip(batch.samples, batch.grids, batch.natives)
            ]
            add(f"oracle 1/{r:g}", batch, RealizationRequest(allocation=oracle, encoding="single", mode="trained"))
        own = model.config.budget_confidence
        for c in confidences:
            model.config.budget_confidence = c
            add(f"auto c={c:g}", batch, RealizationRequest(encoding="single", mode="trained"))
        model.config.budget_confidence = own
        shaping = model.config.relevance_spread, model.config.relevance_floor
        for spread, floor in shapings:
            model.config.relevance_spread, model.config.relevance_floor = spread, floor
            tag = f" [spread {spread}, floor {floor:g}]"
            for r in budgets:
                add(f"heads 1/{r:g}{tag}", batch, RealizationRequest(compression=r, encoding="single", mode="trained"))
            add(f"auto c={own:g}{tag}", batch, RealizationRequest(encoding="single", mode="trained"))
        model.config.relevance_spread, model.config.relevance_floor = shaping
        if confidences:
            add("auto training-free", batch, RealizationRequest(encoding="single", mode="training_free"))
    table = {}
    for key, rows in records.items():
        for task in sorted({r["task"] for r in rows}):
            mine = [r for r in rows if r["task"] == task]
            hits = [r["right"] for r in mine]
            table.setdefault(task, {})[key] = {
                "n": len(mine), "exact_match": round(sum(hits) / len(mine), 3), "ci95": interval(hits),
                "tokens": round(sum(r["tokens"] for r in mine) / len(mine), 1),
                "share_of_native": round(sum(r["tokens"] / r["native"] for r in mine) / len(mine), 3),
                "localisation": round(sum(r["localised"] for r in mine) / len(mine), 3),
            }  # fmt: skip
    return table


def contract_samples(tasks, n: int, offset: int = 0) -> list[dict]:
    """``n`` samples per task from the independently written generator of the task contract."""
    from arr_coc.data import contract
    from arr_coc.tiny.evaluate import condition_samples

    first = contract.SEED_START + offset
    return [dict(s, answers=[s["answer"]], id=first + i) for task in tasks
            for i, s in enumerate(condition_samples(task, n, first, generator=contract.generate))]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="arr-coc-tiny")
    p.add_argument("--processor", default=None, help="where the processor is (default: --model; a checkpoint has none)")
    p.add_argument("--n", type=int, default=50, help="held-out samples per task")
    p.add_argument("--offset", type=int, default=0, help="first held-out seed (offset into the held-out range)")
    p.add_argument("--budgets", default="8,16", help="compression ratios for the heads and the oracle")
    p.add_argument("--confidences", default="0.5,0.8,0.9,0.95",
                   help="budget_confidence values for the auto budget ('': no automatic budget)")  # fmt: skip
    p.add_argument("--calibration", type=int, default=25, help="samples per task for the Spearman check (0: none)")
    p.add_argument("--generator", choices=["project", "contract"], default="project",
                   help="whose samples: the project's held-out seeds, or the independently written generator's "
                   "(`arr_coc.data.contract`, seeds from its SEED_START + offset)")  # fmt: skip
    p.add_argument("--shapings", default="",
                   help="spread:floor pairs of the allocator's input to compare, e.g. '1:0,1:0.3' (`relevance_spread`, "
                   "`relevance_floor`; the model's own rows use its config)")  # fmt: skip
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="an ArrCocConfig field for this study (a JSON value or a bare word), e.g. --set relevance_spread=1",
    )
    p.add_argument("--out", default=None, help="a JSON file for the results")
    args = p.parse_args()
    try:
        settings = parse_settings(args.set)  # before the model loads: a misspelt field fails at once
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    torch.manual_seed(0)
    started = time.time()
    model = arr_coc.ArrCocForConditionalGeneration.from_pretrained(args.model).eval()
    processor = arr_coc.ArrCocProcessor.from_pretrained(args.processor or args.model)
    try:
        for field, value in settings.items():
            setattr(model.config, field, value)
        model.config.check()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    shapings = [(int(a), float(b)) for a, b in (pair.split(":") for pair in args.shapings.split(",") if pair)]
    draw = synthetic_samples if args.generator == "project" else contract_samples
    samples = draw(TASKS, args.n, args.offset)
    result = {
        "model": args.model, "generator": args.generator, "n_per_task": args.n, "offset": args.offset,
        "budget_confidence": model.config.budget_confidence, "min_tokens": model.config.min_tokens,
        "max_tokens": model.config.max_tokens, "relevance_spread": model.config.relevance_spread,
        "relevance_floor": model.config.relevance_floor,
        "table": study(model, processor, samples, [float(b) for b in args.budgets.split(",")],
                       [float(c) for c in args.confidences.split(",") if c], shapings=shapings),
    }  # fmt: skip
    if args.calibration:
        chosen = draw(TASKS, args.calibration, args.offset)
        calibration = measure_calibration(model, processor, chosen)
        rho, n = calibration.spearman()
        result["calibration"] = {"spearman": round(rho, 3), "n": n, **calibration.__dict__,
                                 "smallest_surviving": calibration.smallest_surviving()}  # fmt: skip
    result["seconds"] = round(time.time() - started, 1)
    for task, rows in result["table"].items():
        print(task)
        for key, row in rows.items():
            print(f"  {key:22s} EM {row['exact_match']:.3f} {row['ci95']}  tokens {row['tokens']:6.1f} "
                  f"({row['share_of_native']:.3f} of native)  loc {row['localisation']:.2f}  n={row['n']}")  # fmt: skip
    if "calibration" in result:
        print(f"spearman {result['calibration']['spearman']} on n={result['calibration']['n']}")
    print(f"{result['seconds']} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
