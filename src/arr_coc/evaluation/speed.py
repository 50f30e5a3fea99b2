"""Speed and memory of arr-coc against the full-token backbone, as ratios measured in one run.

Per (model, image size, batch size, encoding, budget): vision-encoder time, relevance-realization time,
language-model prefill time, time to first token (all of them plus the first decoding step),
decoding tokens/s (greedy steps on the prefill's KV cache, timed alone), and peak tensor memory of the
whole first-token path (from the PyTorch profiler's allocation events). Every time is the median of
``repeats`` runs after a warm-up.
Saccade rows time the encoder inside the saccade (gist + crops) with hooks on the encoder module.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from PIL import Image

from ..relevance import RealizationRequest, budget_from_spec


@dataclass
class SpeedRow:
    model: str
    size: int
    batch: int
    budget: str
    encoding: str
    visual_tokens: float  # per image, really used
    native_tokens: int
    vision_s: float
    relevance_s: float
    prefill_s: float
    ttft_s: float
    decode_tokens_per_s: float
    peak_mb: float


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block and restored after (None or 0: left as they are).

    One thread is the fast choice for small tensors on a shared machine: an op split over threads waits for the
    slowest, and a thread the scheduler parks (another job on the cores) stalls every op (measured here: the
    evaluation ran 16x faster on one thread than on two while a training job shared the 2 cores)."""
    threads = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _median_time(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


class EncoderClock:
    """Seconds spent inside the vision encoder while the ``with`` block runs (forward hooks)."""

    def __init__(self, model):
        self.visual, self.seconds, self._start = model.vlm.model.visual, 0.0, 0.0

    def __enter__(self) -> EncoderClock:
        self._handles = [
            self.visual.register_forward_pre_hook(lambda *_: setattr(self, "_start", time.perf_counter())),
            self.visual.register_forward_hook(lambda *_: setattr(self, "seconds", self.seconds + time.perf_counter() - self._start)),
        ]  # fmt: skip
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


def peak_tensor_mb(fn) -> float:
    """Peak bytes of live tensors allocated while ``fn`` runs (profiler memory events), in MB."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # allocations are counted on the op that made them (self, so nested ops count once); frees are "[memory]" events
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def page_image(size: int, seed: int = 0) -> Image.Image:
    """A held-out document page resized to ``size`` x ``size`` px (content matters only to the allocator)."""
    from ..data.synthetic import eval_seeds, generate

    return generate("doc-fields", eval_seeds(1, seed)[0])["image"].resize((size, size), Image.BICUBIC)


def _budget_timings(model, inputs: dict, features, budget: int, repeats: int, new_tokens: int,
                    encoding: str = "single") -> tuple:  # fmt: skip
    """(vision s or None, relevance s, prefill s, time to first token s, decode tokens/s, peak MB, mean tokens
    used) at one budget. Single encoding reuses ``features`` (its vision time is measured once per image
    size); a saccade runs its own encoder calls, timed inside."""
    batch = inputs["input_ids"].shape[0]
    saccade = encoding == "saccade"

    request = RealizationRequest(budget=budget, encoding=encoding)

    def realize(with_features=True):
        encoded = features if with_features and not saccade else None
        images = model.image_inputs(inputs["pixel_values"], inputs["image_grid_thw"], encoded)
        return model.compress_inputs(inputs["input_ids"], inputs["attention_mask"], images, inputs["question_mask"],
                                     request=request)  # fmt: skip

    def prefill(c):
        return model(inputs_embeds=c.inputs_embeds, attention_mask=c.attention_mask, position_ids=c.position_ids,
                     use_cache=True, logits_to_keep=1)  # fmt: skip

    def first_token():
        return prefill(realize(with_features=False)).logits.argmax(-1)

    vision_time = None
    if saccade:
        realize()  # warm-up
        totals, encoder = [], []
        for _ in range(repeats):
            with EncoderClock(model) as clock:
                start = time.perf_counter()
                compressed = realize()
                totals.append(time.perf_counter() - start)
            encoder.append(clock.seconds)
        vision_time = statistics.median(encoder)
        relevance_time = statistics.median(totals) - vision_time
    else:
        relevance_time, compressed = _median_time(realize, repeats)
    prefill_time, _ = _median_time(lambda: prefill(compressed), repeats)
    ttft, _ = _median_time(first_token, repeats)

    def decode_seconds() -> float:  # new_tokens - 1 greedy steps on a fresh prefill's KV cache, timed alone
        out = prefill(compressed)
        cache, step = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        mask, positions = compressed.attention_mask, compressed.position_ids
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            positions = positions[..., -1:] + 1
            out = model(input_ids=step, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
            cache, step = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - start

    decode_seconds()  # warm-up
    decode_rate = batch * (new_tokens - 1) / statistics.median([decode_seconds() for _ in range(repeats)])
    used = float(compressed.tokens_used.float().mean())
    return vision_time, relevance_time, prefill_time, ttft, decode_rate, peak_tensor_mb(first_token), used


@torch.no_grad()
def measure(model, processor, name: str, size: int, batch: int, budgets, repeats: int = 3, new_tokens: int = 8,
            encodings=("single",)) -> list[SpeedRow]:  # fmt: skip
    """One image size and batch size: full first, then each budget ("1/8" fractions or token counts) in each
    encoding."""
    images = [page_image(size, i) for i in range(batch)]
    inputs = processor(images=images, text=["What is the Total?"] * batch)
    vision_time, features = _median_time(
        lambda: model.encode_images(inputs["pixel_values"], inputs["image_grid_thw"]), repeats
    )
    native = math.prod(features[0].grid)
    rows = []
    runs = [("full", "single")] + [(spec, encoding) for encoding in encodings for spec in budgets]
    for spec, encoding in runs:
        budget = budget_from_spec(spec, native)
        vision, relevance, prefill, ttft, decode, peak, used = _budget_timings(
            model, inputs, features, budget, repeats, new_tokens, encoding
        )
        rows.append(SpeedRow(name, size, batch, spec, encoding, used, native, vision_time if vision is None else vision,
                             relevance, prefill, ttft, decode, peak))  # fmt: skip
    return rows


def ratios(rows: list[SpeedRow]) -> list[dict]:
    """Each row with its ratios to the full-token row of the same (model, size, batch)."""
    full = {(r.model, r.size, r.batch): r for r in rows if r.budget == "full"}
    out = []
    for r in rows:
        f = full[(r.model, r.size, r.batch)]
        out.append({
            **asdict(r),
            "prefill_speedup": f.prefill_s / r.prefill_s, "ttft_speedup": f.ttft_s / r.ttft_s,
            "vision_speedup": f.vision_s / r.vision_s,
            "decode_speedup": r.decode_tokens_per_s / f.decode_tokens_per_s, "memory_ratio": r.peak_mb / f.peak_mb,
            "relevance_share_of_vision": r.relevance_s / r.vision_s,
        })  # fmt: skip
    return out


def timing_checks(rows: list[dict], max_decode_per_first_token: float = 200.0) -> list[str]:
    """What the timings must say if the clock was honest (a benchmark's check, not a unit test's: timings move with
    the machine's load): decoding a token on the KV cache costs a share of the first token's path, never nothing,
    so ``decode_tokens_per_s * ttft_s`` stays below ``max_decode_per_first_token``. One line per row that breaks it.
    """
    return [
        f"{r['model']} {r['size']}px batch {r['batch']} {r['budget']} {r['encoding']}: "
        f"{r['decode_tokens_per_s']:.0f} decoded tokens/s against a first token in {r['ttft_s']:.3g} s "
        f"({r['decode_tokens_per_s'] * r['ttft_s']:.0f} tokens per first-token time, more than "
        f"{max_decode_per_first_token:g})"
        for r in rows
        if r["decode_tokens_per_s"] * r["ttft_s"] >= max_decode_per_first_token
    ]


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
    }  # fmt: skip
