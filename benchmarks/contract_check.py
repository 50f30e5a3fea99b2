"""Write a few samples of the independent contract generator (`arr_coc.data.contract`) for a person to look at:
one PNG per sample and one ``samples.jsonl`` line each (file, task, seed, question, answer, answer_box).

    python benchmarks/contract_check.py --out contract_check --n 4 --mark

``--mark`` also writes ``*_marked.png`` with the ``answer_box`` outlined in magenta (1 px, just outside it), to
check by eye that the box holds the answer. Seeds start at the generator's evaluation range (``SEED_START``).
"""

from __future__ import annotations

import argparse
import json
import os

from PIL import ImageDraw

from arr_coc.data.contract import SEED_START, TASKS, generate


def write_samples(out: str, n: int, seed_start: int, mark: bool) -> list[dict]:
    """``n`` samples per task under ``out``; returns the JSONL records written."""
    os.makedirs(out, exist_ok=True)
    records = []
    for task in TASKS:
        for seed in range(seed_start, seed_start + n):
            sample = generate(task, seed)
            name = f"{task}_{seed}.png"
            sample["image"].save(os.path.join(out, name))
            if mark:
                marked = sample["image"].copy()
                x0, y0, x1, y1 = sample["answer_box"]
                ImageDraw.Draw(marked).rectangle((x0 - 1, y0 - 1, x1, y1), outline=(255, 0, 255), width=1)
                marked.save(os.path.join(out, f"{task}_{seed}_marked.png"))
            records.append({
                "file": name, "task": task, "seed": seed, "question": sample["question"],
                "answer": sample["answer"], "answer_box": list(sample["answer_box"]),
            })  # fmt: skip
    with open(os.path.join(out, "samples.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="contract_check", help="folder for the PNGs and samples.jsonl")
    p.add_argument("--n", type=int, default=4, help="samples per task")
    p.add_argument("--seed-start", type=int, default=SEED_START, help="first seed (default: the evaluation range)")
    p.add_argument("--mark", action="store_true", help="also write copies with the answer_box outlined")
    args = p.parse_args()
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    records = write_samples(args.out, args.n, args.seed_start, args.mark)
    print(f"wrote {len(records)} samples to {args.out}/ (samples.jsonl)")


if __name__ == "__main__":
    main()
