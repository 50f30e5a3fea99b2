"""What kind of wrong answers a model gives with every visual token (docs/training.md, "The stable phase to its end").

Each wrong answer on held-out samples is compared with the page's own lines or boxes: another one's value (the search
failed), the right length with characters misread, the right value cut short or run on, or otherwise (characters
dropped, inserted or replaced). Exact match is also split by the answer's length and the font size of its line.

    python benchmarks/reading_errors.py --model arr-coc-tiny --task doc-fields --n 200
"""

from __future__ import annotations

import argparse
import collections
import json

import arr_coc
from arr_coc.data.synthetic import eval_seeds, generate, normalize_answer
from arr_coc.pipeline import answer_batches
from arr_coc.relevance import ALL_TOKENS


def error_kind(answer: str, truth: str, others: set[str]) -> str:
    """One of: right, another item, misread (same length), cut short, run on, other."""
    if answer == truth:
        return "right"
    if answer in others:
        return "another item"
    if truth.startswith(answer):
        return "cut short"
    if answer.startswith(truth):
        return "run on"
    return "misread (same length)" if len(answer) == len(truth) else "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="arr-coc-tiny")
    parser.add_argument("--task", default="doc-fields", choices=("box-codes", "doc-fields"))
    parser.add_argument("--n", type=int, default=200, help="held-out samples (the evaluation seeds)")
    parser.add_argument("--out", default=None, help="a JSON file for the report")
    args = parser.parse_args()

    model = arr_coc.ArrCocForConditionalGeneration.from_pretrained(args.model).eval()
    processor = arr_coc.ArrCocProcessor.from_pretrained(args.model)
    samples = [generate(args.task, seed, layout=True) for seed in eval_seeds(args.n, 0)]
    answers = answer_batches(model, processor, samples, batch_size=8, budget=ALL_TOKENS)
    kinds, by_length, by_size, wrong = collections.Counter(), collections.Counter(), collections.Counter(), []
    for answer, sample in zip(answers, samples):
        answer, truth = normalize_answer(answer), normalize_answer(sample["answer"])
        values = {normalize_answer(i.get("value") or i["code"]): i["font_size"] for i in sample["items"]}
        kind = error_kind(answer, truth, set(values) - {truth})
        kinds[kind] += 1
        size = values[truth] // 2 * 2
        by_length[(len(truth), kind == "right")] += 1
        by_size[(size, kind == "right")] += 1
        if kind != "right":
            wrong.append({"expected": truth, "answer": answer, "kind": kind, "font_size": values[truth]})

    def split(counter: collections.Counter) -> dict:
        keys = sorted({k for k, _ in counter})
        return {k: f"{counter[(k, True)]}/{counter[(k, True)] + counter[(k, False)]}" for k in keys}

    report = {"model": args.model, "task": args.task, "n": args.n, "kinds": dict(kinds),
              "right by answer length": split(by_length), "right by font size (2 px bins)": split(by_size),
              "wrong": wrong}  # fmt: skip
    print(json.dumps({k: v for k, v in report.items() if k != "wrong"}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
