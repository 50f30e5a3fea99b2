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
    from transformers import BitsAndBytesConfig, TorchAoConfig

    def int8():
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(quant_type=Int8WeightOnlyConfig())

    return {
        "fp32": {},
        "bf16": {"dtype": torch.bfloat16},
        "fp16": {"dtype": torch.float16},
        "bnb-8bit": {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": "cpu"},
        "bnb-4bit": {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32), "device_map": "cpu"},
        "torchao-int8": {"quantization_config": int8(), "device_map": "cpu"},
        "disk-offload": {"device_map": {"model.visual": "cpu", "model.language_model": "disk", "lm_head": "cpu"}, "offload_folder": offload_dir},
    }  # fmt: skip


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

    folder = arr_coc.resolve_model_path(args.model)
    processor = arr_coc.ArrCocProcessor.from_pretrained(folder)
    samples = synthetic_samples(["box-codes", "doc-fields"], args.n)
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as offload:
        for name, options in loaders(folder, offload).items():
            started = time.perf_counter()
            model = arr_coc.ArrCocForConditionalGeneration.from_pretrained(folder, **options).eval()
            load_s = time.perf_counter() - started
            answers, correct, started = [], 0, time.perf_counter()
            for i in range(0, len(samples), 4):
                batch = samples[i : i + 4]
                inputs = processor(images=[s["image"] for s in batch], text=[s["question"] for s in batch])
                out = model.generate(**inputs, compression=args.compression, max_new_tokens=8, do_sample=False)
                texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                answers += [t.strip() for t in texts]
                correct += sum(normalize_answer(t) == normalize_answer(s["answer"]) for t, s in zip(texts, batch))
            seconds = time.perf_counter() - started
            reference = reference or answers
            rows.append({
                "path": name, "memory_mb": round(model.get_memory_footprint() / 2**20, 2), "load_s": round(load_s, 2),
                "seconds_per_sample": round(seconds / len(samples), 3), "exact_match": correct / len(samples),
                "agreement_with_fp32": sum(a == b for a, b in zip(answers, reference)) / len(samples),
            })  # fmt: skip
            print(rows[-1], file=sys.stderr, flush=True)
            del model
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": "python benchmarks/loading.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "model": args.model, "n": len(samples), "compression": args.compression, "rows": rows}, f, indent=1)  # fmt: skip
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
