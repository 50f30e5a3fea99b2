"""Encode once, train the language model many times: stages whose vision encoder is frozen read a fixed pool of
samples whose encoder outputs were computed once (``python -m arr_coc.tiny cache``), so each epoch costs only the
language model. The pool is tied to the encoder that made it: training refuses a cache from other vision weights."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..padding import left_pad
from ..training.cache import vision_fingerprint
from .data import batch_samples, collate
from .model import IGNORE

SHARD = 64  # samples per cache file


def cache_dir(run: str, stage: str) -> str:
    return os.path.join(run, f"cache-{stage}")


@torch.no_grad()
def build_cache(run: str, stage: str, n: int, seed: int = 0, batch_size: int = 16, device: str = "cpu") -> str:
    """Encode ``n`` samples of ``stage`` (its crops and scales, seeded) with the run's vision encoder into
    ``cache_dir(run, stage)``: per sample the merged tokens [h*w/4, d] (fp16), its grid, prompt+answer ids and
    labels. Resumes where a stopped build left off (shards are written atomically)."""
    from tqdm.auto import tqdm

    from .train import load_run

    model, _, tokenizer, image_processor, _, _ = load_run(run, device)
    model.eval()
    out = cache_dir(run, stage)
    os.makedirs(out, exist_ok=True)
    meta = {"stage": stage, "n": n, "seed": seed, "vision": vision_fingerprint(model)}
    meta_path = os.path.join(out, "cache.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old != meta:
            raise ValueError(f"{out} holds another cache ({old}); remove it to build {meta}")
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    for shard in tqdm(range(math.ceil(n / SHARD)), desc=f"encoding {stage}"):
        path = os.path.join(out, f"shard-{shard:05d}.safetensors")
        if os.path.exists(path):
            continue
        tensors = {}
        for first in range(shard * SHARD, min(n, (shard + 1) * SHARD), batch_size):
            count = min(batch_size, n - first, (shard + 1) * SHARD - first)
            # the pool's sample i is step (i // batch_size)'s sample (i % batch_size), as a training stage draws them
            samples = batch_samples(stage, first // batch_size, batch_size, seed)[first % batch_size :][:count]
            batch = {k: v.to(device) for k, v in collate(samples, tokenizer, image_processor).items()}
            vision = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
            for j, features in enumerate(vision):
                keep = batch["attention_mask"][j].bool()
                tensors.update({
                    f"{first + j}.features": features.half().cpu(), f"{first + j}.grid": batch["image_grid_thw"][j].cpu(),
                    f"{first + j}.input_ids": batch["input_ids"][j][keep].cpu(), f"{first + j}.labels": batch["labels"][j][keep].cpu(),
                })  # fmt: skip
        save_file(tensors, path + ".tmp")
        os.replace(path + ".tmp", path)
    return out


class CachedBatches(torch.utils.data.IterableDataset):
    """Batches of steps ``[start, stop)`` from a cache: each epoch a seeded permutation of the pool, right-padded."""

    def __init__(self, directory: str, start: int, stop: int, batch_size: int, seed: int, pad_id: int,
                 image_token_id: int, fingerprint: str):  # fmt: skip
        super().__init__()
        with open(os.path.join(directory, "cache.json")) as f:
            self.meta = json.load(f)
        if self.meta["vision"] != fingerprint:
            raise ValueError(
                f"{directory} was encoded by another vision encoder ({self.meta['vision']}, this run's is {fingerprint}); "
                f"rebuild it with `python -m arr_coc.tiny cache --run RUN --stage {self.meta['stage']}`"
            )
        shards = sorted(f for f in os.listdir(directory) if f.startswith("shard-") and f.endswith(".safetensors"))
        if len(shards) < math.ceil(self.meta["n"] / SHARD):
            raise ValueError(f"{directory} is incomplete ({len(shards)} shards); finish it with the cache command")
        self.samples = {}
        for name in shards:
            for key, value in load_file(os.path.join(directory, name)).items():
                index, field = key.split(".")
                self.samples.setdefault(int(index), {})[field] = value
        self.args = (start, stop, batch_size, seed)
        self.pad_id, self.image_token_id = pad_id, image_token_id

    def batch(self, step: int) -> dict:
        start, stop, batch_size, seed = self.args
        n = len(self.samples)
        per_epoch = n // batch_size
        epoch, offset = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)[offset * batch_size : (offset + 1) * batch_size]
        rows = [self.samples[int(i)] for i in order]
        input_ids = left_pad([r["input_ids"] for r in rows], self.pad_id)
        return {
            "input_ids": input_ids, "labels": left_pad([r["labels"] for r in rows], IGNORE),
            "attention_mask": left_pad([torch.ones_like(r["input_ids"]) for r in rows], 0),
            "mm_token_type_ids": (input_ids == self.image_token_id).int(),
            "image_grid_thw": torch.stack([r["grid"] for r in rows]),
            "features": torch.cat([r["features"] for r in rows]).float(),
        }  # fmt: skip

    def __iter__(self):
        start, stop, _, _ = self.args
        for step in range(start, stop):
            yield self.batch(step)
