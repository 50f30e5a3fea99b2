"""Memory and speed of each way to load a backbone: fp32, bf16, fp16, bitsandbytes 8-bit / 4-bit, torchao
int8 weight-only, and disk offload – plus answer agreement with fp32 on held-out samples.

    python benchmarks/loading.py --model arr-coc-tiny --n 40 --out docs/results/loading.json

The model folder must be an arr-coc model; its backbone is what gets quantized (the heads stay fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch


def loaders(folder: str, offload_dir: str) -> dict:
    from arr_coc.evaluation.quantization import QUANTIZATIONS, quantization_config

    return {
        "fp32": {},
        "bf16": {"dtype": torch.bfloat16},
        "fp16": {"dtype": torch.float16},
        **{name: {"quantization_config": quantization_config(name), "device_map": "cpu"} for name in QUANTIZATIONS},
        "disk-offload": {"device_map": {"model.visual": "cpu", "model.language_model": "disk", "lm_head": "disk"}, "offload_folder": offload_dir},
    }  # fmt: skip


@torch.no_grad()
def exported_heads_timing(folder: str, processor, samples: list[dict]) -> dict:
    """The relevance heads in PyTorch vs exported to ONNX under onnxruntime, per image (the serving stack's
    middle step), and whether their allocations agree."""
    import arr_coc
    from arr_coc.export import OnnxRelevance, export_heads

    model = arr_coc.ArrCocForConditionalGeneration.from_pretrained(folder, mode="trained").eval()
    per_image = []
    for s in samples:
        inputs = processor(images=[s["image"]], text=[s["question"]])
        features = model.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])[0]
        question = model.adapter.embed_tokens(inputs["input_ids"])[0][inputs["question_mask"][0].bool()]
        per_image.append((features, question))
    with tempfile.TemporaryDirectory() as out:
        export_heads(model, out)
        onnx = OnnxRelevance(out)
        torch_s, onnx_s, agree = 0.0, 0.0, 0
        for features, question in per_image:
            _, h, w = features.grid
            started = time.perf_counter()
            info, sal, coup, relevance, _, expected = model.relevance(features.tokens, (h, w), question, True,
                                                                       model.config.min_tokens, model.config.max_tokens)  # fmt: skip
            ours, _ = model.allocator.decide(relevance, h, w, float(expected), model.config.min_tokens,
                                             model.config.max_tokens)  # fmt: skip
            torch_s += time.perf_counter() - started
            started = time.perf_counter()
            _, theirs = onnx(features.tokens.numpy(), question.numpy(), h, w)
            onnx_s += time.perf_counter() - started
            agree += ours == theirs
    n = len(per_image)
    return {"images": n, "pytorch_ms_per_image": round(1000 * torch_s / n, 2), "onnxruntime_ms_per_image":
            round(1000 * onnx_s / n, 2), "allocations_equal": agree / n}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="arr-coc-tiny")
    parser.add_argument("--n", type=int, default=40, help="held-out samples per task")
    parser.add_argument("--compression", type=float, default=4.0)
    parser.add_argument("--out", default="docs/results/loading.json")
    args = parser.parse_args(argv)

    import arr_coc
    from arr_coc.data.synthetic import normalize_answer
    from arr_coc.evaluation.harness import synthetic_samples
    from arr_coc.pipeline import answer_batches

    folder = arr_coc.resolve_model_path(args.model)
    processor = arr_coc.ArrCocProcessor.from_pretrained(folder)
    samples = synthetic_samples(["box-codes", "doc-fields"], args.n)
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as offload:
        for name, options in loaders(folder, offload).items():
            started = time.perf_counter()
            model = arr_coc.ArrCocForConditionalGeneration.from_pretrained(folder, **options).eval()
            load_s = time.perf_counter() - started
            started = time.perf_counter()
            answers = answer_batches(model, processor, samples, compression=args.compression)
            seconds = time.perf_counter() - started
            correct = sum(normalize_answer(a) == normalize_answer(s["answer"]) for a, s in zip(answers, samples))
            reference = reference or answers
            rows.append({
                "path": name, "memory_mb": round(model.get_memory_footprint() / 2**20, 2), "load_s": round(load_s, 2),
                "seconds_per_sample": round(seconds / len(samples), 3), "exact_match": correct / len(samples),
                "agreement_with_fp32": sum(a == b for a, b in zip(answers, reference)) / len(samples),
            })  # fmt: skip
            print(rows[-1], file=sys.stderr, flush=True)
            del model
    heads = exported_heads_timing(folder, processor, samples[: min(len(samples), 20)])
    print(heads, file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": "python benchmarks/loading.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "model": args.model, "n": len(samples), "compression": args.compression, "rows": rows,
                   "exported_heads": heads}, f, indent=1)  # fmt: skip
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
