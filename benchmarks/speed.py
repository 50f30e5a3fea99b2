"""Speed and memory benchmark: arr-coc-tiny and a Qwen2-VL-2B-shaped model (real widths, random weights,
depth reduced by flags so it runs on a CPU), at 448 / 896 / 1344 px, batch 1 and 8, ratios to full.

    python benchmarks/speed.py --out docs/results/speed.json
    python benchmarks/speed.py --models 2b --vision-depth 4 --text-layers 4 --sizes 1344 --batches 1

Results: a JSON file read by benchmarks/report.py (which writes docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def build_2b(vision_depth: int, text_layers: int, vocab: int):
    """Qwen2-VL-2B's widths with random weights; the arr-coc-tiny tokenizer/processor (token ids < its vocab)."""
    from transformers import Qwen2VLForConditionalGeneration

    import arr_coc
    from arr_coc.backbones.shapes import qwen2_vl_2b_config

    processor = arr_coc.ArrCocProcessor.from_pretrained("arr-coc-tiny")
    # Qwen2-VL-2B's own pixel range (arr-coc-tiny's caps images at 1280 tokens, 1344 px would shrink)
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}
    config = qwen2_vl_2b_config(processor.tokenizer, text_layers=text_layers, vision_depth=vision_depth)
    config.text_config.vocab_size = vocab
    torch.manual_seed(0)
    vlm = Qwen2VLForConditionalGeneration(config).eval()
    model = arr_coc.ArrCocForConditionalGeneration.from_backbone(vlm, allocator="quadtree").eval()
    return model, processor


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,2b", help="tiny (arr-coc-tiny) and/or 2b (Qwen2-VL-2B-shaped)")
    parser.add_argument("--sizes", default="448,896,1344")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--budgets", default="1/2,1/4,1/8,1/16")
    parser.add_argument("--encodings", default="single,saccade", help="single and/or saccade rows per budget")
    parser.add_argument("--vision-depth", type=int, default=4, help="2B-shaped vision blocks (real: 32)")
    parser.add_argument("--text-layers", type=int, default=4, help="2B-shaped language-model layers (real: 28)")
    parser.add_argument("--vocab", type=int, default=151936, help="2B-shaped vocabulary (the real one's size)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement after a warm-up (median)")
    parser.add_argument("--out", default="docs/results/speed.json")
    args = parser.parse_args(argv)

    import arr_coc
    from arr_coc.evaluation.speed import machine, measure, ratios, timing_checks

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    encodings = tuple(e.strip() for e in args.encodings.split(","))
    rows = []
    started = time.time()
    for name in args.models.split(","):
        if name == "tiny":
            model = arr_coc.ArrCocForConditionalGeneration.from_pretrained("arr-coc-tiny").eval()
            processor = arr_coc.ArrCocProcessor.from_pretrained("arr-coc-tiny")
        elif name == "2b":
            model, processor = build_2b(args.vision_depth, args.text_layers, args.vocab)
        else:
            raise SystemExit(f"unknown model {name!r}")
        for size in (int(s) for s in args.sizes.split(",")):
            for batch in (int(b) for b in args.batches.split(",")):
                probe = time.time()
                got = measure(model, processor, name, size, batch, args.budgets.split(","), repeats=args.repeats,
                              encodings=encodings)  # fmt: skip
                rows += got
                print(f"{name} {size}px batch {batch}: {time.time() - probe:.0f}s", file=sys.stderr, flush=True)
    result = {
        "command": "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "wall_s": round(time.time() - started, 1),
        "settings": {"vision_depth_2b": args.vision_depth, "text_layers_2b": args.text_layers, "vocab_2b": args.vocab},
        "rows": ratios(rows),
    }  # fmt: skip
    result["timing_problems"] = timing_checks(result["rows"])
    for problem in result["timing_problems"]:
        print(f"timing check: {problem}", file=sys.stderr)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
