"""Where arr-coc-tiny's training time goes on this machine: images/s per curriculum stage, and per step the
vision encoder's attention and the rest of it, the language model, and the data rendering; beside it the same
vision tower as Qwen2.5-VL's windowed classes, thread counts and torch.compile – the levers that decide the recipe.

    python benchmarks/tiny_training.py --out docs/results/tiny_training.json

Every number is a median over ``--repeats`` steps measured in one run, in CPU seconds of this process on one
thread (``time.process_time``), so that other work on the machine barely moves it; wall seconds on two threads
are measured once beside it. Results are written as JSON and summarised in docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _median_time(fn, repeats: int, clock=time.process_time) -> float:
    fn()  # warm-up (allocator, one-time work)
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def _sdpa_seconds(fn) -> float:
    """Seconds spent in scaled-dot-product attention (forward and backward) during one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if "scaled_dot_product" in e.key) / 1e6


def qwen2_5_vision_tower(vision_config):
    """Qwen2.5-VL's vision tower at arr-coc-tiny's widths: 112-px windows, the last block attending globally."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    config = Qwen2_5_VLVisionConfig(
        depth=vision_config.depth, hidden_size=vision_config.embed_dim, intermediate_size=2 * vision_config.embed_dim,
        num_heads=vision_config.num_heads, out_hidden_size=vision_config.hidden_size, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[vision_config.depth - 1],
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen2_5_VisionTransformerPretrainedModel._from_config(config).train()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results/tiny_training.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time the vision tower under torch.compile")
    args = parser.parse_args(argv)

    from arr_coc.modeling_arr_coc import ArrCocForConditionalGeneration
    from arr_coc.processing_arr_coc import ArrCocProcessor
    from arr_coc.tiny.data import STAGES, batch_samples, collate
    from arr_coc.tiny.model import DenseGlyphHead, tiny_image_processor
    from arr_coc.tiny.train import dense_loss

    vlm = ArrCocForConditionalGeneration.from_pretrained("arr-coc-tiny").vlm.float().train()
    tokenizer = ArrCocProcessor.from_pretrained("arr-coc-tiny").tokenizer
    image_processor = tiny_image_processor()
    vc = vlm.config.vision_config
    head = DenseGlyphHead(vlm.config.text_config.hidden_size, vc.embed_dim)
    params = list(vlm.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    torch.set_num_threads(1)
    result = {"unit": "CPU seconds, one thread", "repeats": args.repeats, "stages": {}}

    for name, spec in STAGES.items():
        render = _median_time(lambda name=name, spec=spec: batch_samples(name, 0, spec.batch_size, 0), args.repeats)
        samples = batch_samples(name, 1, spec.batch_size, 0)
        collate_s = _median_time(lambda samples=samples: collate(samples, tokenizer, image_processor), args.repeats)
        batch = collate(samples, tokenizer, image_processor)

        def vision_step(batch=batch):
            vision = vlm.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
            return vision, dense_loss(head, vision, batch)[0]

        with torch.no_grad():  # a cached stage's pool: encoded once, forward only
            encoded = vlm.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        encode_once = _median_time(
            lambda batch=batch: vlm.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]), 1
        )

        def full_step(batch=batch, spec=spec, encoded=encoded):
            vision, loss = (encoded, torch.zeros(())) if spec.cached else vision_step()
            if spec.lm_weight:
                out = vlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
                          mm_encoder_outputs={"image": vision}, labels=batch["labels"])  # fmt: skip
                loss = loss + out.loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def vision_only():
            optimizer.zero_grad(set_to_none=True)
            vision_step()[1].backward()

        step = _median_time(full_step, args.repeats)
        vision = 0.0 if spec.cached else _median_time(vision_only, args.repeats)
        vision_attention = 0.0 if spec.cached else _sdpa_seconds(vision_only)
        images = spec.batch_size
        result["stages"][name] = {
            "batch_size": images, "patches": int(batch["pixel_values"].shape[0]),
            "step_s": round(step, 3), "images_per_s": round(images / step, 2),
            "vision_s": round(vision, 3), "vision_attention_s": round(vision_attention, 3),
            "vision_other_s": round(vision - vision_attention, 3), "language_model_and_optimizer_s": round(step - vision, 3),
            "render_s": round(render, 3), "collate_s": round(collate_s, 3),
            "encode_once_s": round(encode_once, 3) if spec.cached else None,
        }  # fmt: skip
        print(name, json.dumps(result["stages"][name]), flush=True)

    # The levers, on the `native` stage's batch: Qwen2.5-VL's windowed vision tower (random weights, same widths),
    # one thread instead of two, torch.compile.
    batch = collate(batch_samples("native", 1, STAGES["native"].batch_size, 0), tokenizer, image_processor)
    pixels, grid = batch["pixel_values"], batch["image_grid_thw"]

    def tower_step(tower):
        def run():
            out = tower(pixels, grid_thw=grid)
            out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
            out.float().pow(2).mean().backward()

        return run

    levers = {"qwen2_vl_vision_s": _median_time(tower_step(vlm.model.visual), args.repeats)}
    windowed = qwen2_5_vision_tower(vc)
    levers["qwen2_5_vl_windowed_vision_s"] = _median_time(tower_step(windowed), args.repeats)
    levers["qwen2_5_vl_windowed_attention_s"] = _sdpa_seconds(tower_step(windowed))
    torch.set_num_threads(2)
    levers["qwen2_vl_vision_wall_s_1_thread"] = levers["qwen2_vl_vision_s"]  # one thread: CPU s = wall s
    levers["qwen2_vl_vision_wall_s_2_threads"] = _median_time(
        tower_step(vlm.model.visual), args.repeats, time.perf_counter
    )
    torch.set_num_threads(1)
    if args.compile:
        compiled = torch.compile(vlm.model.visual, dynamic=True)
        start = time.perf_counter()
        tower_step(compiled)()
        levers["compile_first_call_s"] = round(time.perf_counter() - start, 1)
        levers["qwen2_vl_vision_compiled_s"] = _median_time(tower_step(compiled), args.repeats)
    result["levers_native_batch"] = {k: round(v, 3) for k, v in levers.items()}
    print(json.dumps(result["levers_native_batch"]), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
