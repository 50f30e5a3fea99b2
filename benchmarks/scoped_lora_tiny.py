"""Does the language model's scoped LoRA help arr-coc-tiny read compressed sequences? Exact match with and without
it on the same held-out samples (`arr_coc.evaluation.harness.synthetic_samples`), at the given budgets, with a paired
95% interval for the difference; the all-token answers of both models are compared too (they must be the same: the
adapter is off at a budget >= native).

    arr-coc train --model arr-coc-tiny --lm-lora r=8 --train-parts "" --objectives answer=1 \\
        --compression-range 4,24 --max-steps 300 --save-heads-only --output-dir runs/lm8
    python benchmarks/scoped_lora_tiny.py --lora runs/lm8/heads --n 50 --out scoped_lora_tiny.json

Run with ``OMP_NUM_THREADS=1`` on a shared CPU.
"""

from __future__ import annotations

import argparse
import json
import random

from arr_coc import ArrCocForConditionalGeneration, ArrCocProcessor
from arr_coc.data.synthetic import TASKS
from arr_coc.evaluation.harness import evaluate, method_named, synthetic_samples


def paired_interval(a: list[float], b: list[float], draws: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval (percentile, resampling samples) of mean(b) - mean(a) over paired outcomes."""
    rng, n = random.Random(seed), len(a)
    diffs = sorted(
        sum(b[i] - a[i] for i in (rng.randrange(n) for _ in range(n))) / n for _ in range(draws)
    )  # fmt: skip
    return diffs[int(0.025 * draws)], diffs[int(0.975 * draws) - 1]


def compare(model_name: str, lora: str, n: int, budgets: list[str], batch_size: int) -> dict:
    """Exact match per task and budget without / with the LoRA, their paired difference, and the all-token check."""
    processor = ArrCocProcessor.from_pretrained(model_name)
    samples = synthetic_samples(TASKS, n)
    runs = {}
    for name, path in (("without", model_name), ("with", lora)):
        model = ArrCocForConditionalGeneration.from_pretrained(path).eval()
        result = evaluate(model, processor, samples, methods=["full", "arr-coc"], budgets=budgets,
                          batch_size=batch_size, threads=1)  # fmt: skip
        runs[name] = {(r.task, r.method, r.budget, r.sample): r for r in result.records}
    rows = []
    for task in TASKS:
        for method, budget in [("full", method_named("full").label), *[("arr-coc", b) for b in budgets]]:
            keys = sorted(k for k in runs["without"] if k[:3] == (task, method, budget))
            a = [float(runs["without"][k].exact) for k in keys]
            b = [float(runs["with"][k].exact) for k in keys]
            lo, hi = paired_interval(a, b)
            same = sum(runs["without"][k].prediction == runs["with"][k].prediction for k in keys)
            rows.append({"task": task, "budget": budget, "n": len(keys), "without": sum(a) / len(a),
                         "with": sum(b) / len(b), "difference": (sum(b) - sum(a)) / len(a), "interval95": [lo, hi],
                         "same_answers": same})  # fmt: skip
    return {"model": model_name, "lora": lora, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="arr-coc-tiny")
    parser.add_argument("--lora", required=True, help="the model with the trained language-model scoped LoRA")
    parser.add_argument("--n", type=int, default=50, help="held-out samples per task")
    parser.add_argument("--budgets", default="1/8,1/16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the rows here (JSON)")
    args = parser.parse_args()
    report = compare(args.model, args.lora, args.n, args.budgets.split(","), args.batch_size)
    for r in report["rows"]:
        print(f"{r['task']:11s} {r['budget']:5s} n={r['n']:3d}  without {r['without']:.2f}  with {r['with']:.2f}  "
              f"diff {r['difference']:+.2f} [{r['interval95'][0]:+.2f}, {r['interval95'][1]:+.2f}]  "
              f"same answers {r['same_answers']}/{r['n']}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
