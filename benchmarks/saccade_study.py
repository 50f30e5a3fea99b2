"""The saccade against its gist scale and crop margin, on held-out synthetic samples (issue 19's measurements).

Per task, gist scale (``auto`` or a number), crop margin and compression: exact match, localisation (the answer's
box entirely read at full resolution) and the mean tokens passed on, with ``encoding="saccade"``.

    python benchmarks/saccade_study.py --model arr-coc-tiny --n 40 --offset 1000 --gist-scales 4,3,2 --margins 0
    python benchmarks/saccade_study.py --model arr-coc-tiny --n 40 --offset 1000 --gist-scales auto --margins 0,1,2

``--offset`` moves to other held-out seeds (choose settings there, report on offset 0).
"""

from __future__ import annotations

import argparse
import json

import torch

import arr_coc
from arr_coc.data.synthetic import TASKS, normalize_answer
from arr_coc.evaluation.harness import box_covered, synthetic_samples


@torch.no_grad()
def measure(model, processor, samples: list[dict], compression: int, margin: int, batch_size: int) -> dict:
    hits = localised = used = 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        inputs = processor(images=[s["image"] for s in chunk], text=[s["question"] for s in chunk])
        options = dict(compression=compression, encoding="saccade", crop_margin=margin)
        out = model.generate(**inputs, **options, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
        texts = processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for s, text, r in zip(chunk, texts, out.realizations):  # one image a sample, in order
            hits += normalize_answer(text) == s["answer"]
            localised += box_covered(r.detail_map(), s["answer_box"], s["image"].size)
            used += r.tokens_used
    n = len(samples)
    return {"exact_match": round(hits / n, 3), "localisation": round(localised / n, 3), "tokens": round(used / n, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="arr-coc-tiny")
    p.add_argument("--n", type=int, default=40, help="held-out samples per task")
    p.add_argument("--offset", type=int, default=1000, help="first held-out seed (1000: validation seeds)")
    p.add_argument("--gist-scales", default="auto", help="comma-separated: 'auto' and/or integers >= 2")
    p.add_argument("--margins", default="1", help="comma-separated crop margins (merged cells)")
    p.add_argument("--compressions", default="4,8", help="comma-separated compression ratios")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="a JSON file for the results")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = arr_coc.ArrCocForConditionalGeneration.from_pretrained(args.model).eval()
    processor = arr_coc.ArrCocProcessor.from_pretrained(args.model)
    rows = []
    for task in TASKS:
        samples = synthetic_samples([task], args.n, args.offset)
        for scale in args.gist_scales.split(","):
            model.config.gist_scale = scale if scale == "auto" else int(scale)
            model.config.check()
            for margin in (int(m) for m in args.margins.split(",")):
                for compression in (int(c) for c in args.compressions.split(",")):
                    row = dict(task=task, gist_scale=scale, crop_margin=margin, compression=compression,
                               **measure(model, processor, samples, compression, margin, args.batch_size))  # fmt: skip
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "n": args.n, "offset": args.offset, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
