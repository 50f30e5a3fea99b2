"""Encode once, train the heads many times (``arr-coc train --cache-encoder DIR``).

While the vision encoder is frozen its output for a training image never changes, so the pool is encoded once:
per sample the `VisionFeatures` (tokens and any extra per-token features, e.g. Qwen3-VL's deepstack) in the
encoder's own dtype, with the token rows the processor made (input_ids, labels, question_mask) and the answer box.
Training steps then read those (`CachedPool`, `CachedCollator`) and pass them to the model as ``image_features``:
the vision encoder never runs in a step, and the step equals the uncached one (tests/test_training_cache.py).

For a saccade run (``--encoding saccade``) each sample also keeps its gist, encoded at the scale the model's settings
choose for it (`ImageInput.gist_scale`); a step then reads relevance on the cached gist and each crop from the cached
whole-image encoding – the crop a margin covering the whole image would give (`ImageInput.crops`), so the step equals
the uncached one with ``crop_margin`` that wide. The heads only ever see the gist; the crops enter the answer loss.

Layout of DIR (one per pool): ``cache.json`` (format, the encoder's fingerprint, the pool's description, sample
and shard counts) and ``shard-00000.safetensors``... of ``SHARD`` samples each, each written atomically, so a
stopped build continues where it stopped. A pool encoded by other vision weights, or of other data, is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..backbones.base import VisionFeatures
from ..padding import left_pad
from ..scoped_lora import has_scoped_lora, lora_scope
from ..sequence import IGNORE_INDEX

FORMAT = 1
META = "cache.json"
SHARD = 64  # samples per shard file
ROWS = ("input_ids", "labels", "question_mask")  # the processor's per-token rows a step needs


def vision_fingerprint(vlm) -> str:
    """A hash of a backbone's vision encoder weights (``vlm.model.visual``, the merger included): 16 hex digits."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vlm.model.visual.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_cached_training(model, objectives, encoding: str) -> None:
    """Raise `ValueError` when a trained part needs the vision encoder to run in the step: a trainable parameter in
    the vision encoder or its merger, a saccade run of a model with a vision scoped LoRA (its crops are encoded
    otherwise than the whole image the pool reads them from), or the ``consistency`` objective (it trains the
    encoder)."""
    moving = [n for n, p in model.vlm.model.visual.named_parameters() if p.requires_grad]
    if moving:
        raise ValueError(
            f"--cache-encoder trains on a frozen vision encoder's outputs, but {len(moving)} of its parameters are "
            f"trainable (e.g. {moving[0]}): drop vision_encoder/merger from --train-parts and --vision-lora from the "
            "command, or train without the cache"
        )
    if encoding == "saccade" and has_scoped_lora(model, "vision"):
        raise ValueError(
            "--cache-encoder reads a saccade's crops from the whole image's encoding, but this model's vision scoped "
            "LoRA encodes crops otherwise: train its saccade heads without --cache-encoder"
        )
    if objectives.consistency:
        raise ValueError(
            "the consistency objective trains the vision encoder, which --cache-encoder never runs: train it without "
            "the cache"
        )


def _describe(dataset, processor, extra: dict) -> dict:
    return {"samples": len(dataset), "image_processor": processor.image_processor.to_json_string(), **extra}


@torch.no_grad()
def build_cache(model, collator, dataset, directory: str, description: dict | None = None, batch_size: int = 8,
                progress: bool = True, saccade: bool = False) -> str:  # fmt: skip
    """Encode every sample of ``dataset`` (examples as ``collator`` – a `VQACollator` – takes them, one image each)
    with ``model``'s vision encoder into ``directory``; returns it. ``saccade``: also each image's gist, at the scale
    the model's ``gist_scale`` / ``gist_text_px`` choose for it (the pool records them).

    ``description``: what the pool is (data spec, counts, seeds), stored and compared so another pool is never
    read as this one. Continues a stopped build. Raises `ValueError` when ``directory`` holds a pool of other
    data or from another vision encoder (remove it or pick another directory), or a batch has not one image per
    sample.
    """
    from tqdm.auto import tqdm

    description = dict(description or {})
    if saccade:
        description["gist"] = {"gist_scale": model.config.gist_scale, "gist_text_px": model.config.gist_text_px}
    meta = {"format": FORMAT, "encoder": vision_fingerprint(model.vlm), "shard_size": SHARD,
            "pool": _describe(dataset, collator.processor, description)}  # fmt: skip
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, META)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        _check_encoder(directory, old, meta["encoder"])
        if old != meta:
            keys = sorted(set(old["pool"]) | set(meta["pool"]))
            differ = [k for k in keys if old["pool"].get(k) != meta["pool"].get(k)]
            shown = "; ".join(
                f"{k}: the pool's {_brief(old['pool'].get(k))}, asked {_brief(meta['pool'].get(k))}" for k in differ
            )
            raise ValueError(
                f"{directory} holds an encoded pool of other data ({shown or 'another layout'}); remove it or pass "
                "another directory"
            )
    else:
        with open(path, "w") as f:
            json.dump(meta, f, indent=1)
    n = len(dataset)
    shards = range(math.ceil(n / SHARD))
    for shard in tqdm(shards, desc=f"encoding {n} samples", disable=not progress):
        file = os.path.join(directory, f"shard-{shard:05d}.safetensors")
        if os.path.exists(file):
            continue
        tensors = {}
        for first in range(shard * SHARD, min(n, (shard + 1) * SHARD), batch_size):
            indices = list(range(first, min(first + batch_size, n, (shard + 1) * SHARD)))
            tensors.update(_encode_batch(model, collator, [dataset[i] for i in indices], indices, saccade))
        save_file(tensors, file + ".tmp")
        os.replace(file + ".tmp", file)
    return directory


def _brief(value) -> str:
    """A pool description's value for an error message (long ones, e.g. a processor's JSON, cut short)."""
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def _encode_batch(model, collator, examples: list[dict], indices: list[int], saccade: bool) -> dict[str, torch.Tensor]:
    batch = collator(examples)
    grids = batch["image_grid_thw"]
    if grids.shape[0] != len(examples):
        raise ValueError(f"--cache-encoder takes one image per sample; a batch of {len(examples)} had {len(grids)}")
    device = next(model.vlm.parameters()).device
    images = model.image_inputs(batch["pixel_values"].to(device), grids.to(device))
    out = {}
    for j, (i, image) in enumerate(zip(indices, images)):
        encoded = image.features
        keep = batch["attention_mask"][j].bool()
        row = {name: batch[name][j][keep] for name in ROWS}
        row.update(grid=torch.tensor(encoded.grid), image_grid_thw=grids[j], tokens=encoded.tokens)
        row.update({f"extra.{k}": x for k, x in enumerate(encoded.extra)})
        if saccade:
            scale = image.gist_scale(model.config.gist_scale, model.config.gist_text_px)
            with lora_scope(model, "vision"):
                gist = image.gist(scale)
            row.update(
                {"gist.scale": torch.tensor(scale), "gist.grid": torch.tensor(gist.grid), "gist.tokens": gist.tokens}
            )
            row.update({f"gist.extra.{k}": x for k, x in enumerate(gist.extra)})
        if "answer_box" in batch:
            row.update(answer_box=batch["answer_box"][j], image_size=batch["image_size"][j])
        out.update({f"{i}.{name}": x.detach().cpu().clone().contiguous() for name, x in row.items()})
    return out


def _check_encoder(directory: str, meta: dict, fingerprint: str) -> None:
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory} is in cache format {meta.get('format')}, this arr-coc reads {FORMAT}: remove it")
    if meta["encoder"] != fingerprint:
        raise ValueError(
            f"{directory} was encoded by another vision encoder (fingerprint {meta['encoder']}; this model's is "
            f"{fingerprint}): its outputs do not belong to this model – remove the directory to encode the pool again, "
            "or pass another --cache-encoder"
        )


class CachedPool(torch.utils.data.Dataset):
    """A pool encoded by `build_cache`: ``pool[i]`` is sample i's rows, encoder outputs and answer box (tensors),
    read from its shard on demand (memory-mapped).

    Raises `ValueError` when ``directory`` is no complete pool or was encoded by a vision encoder whose
    `vision_fingerprint` is not ``fingerprint``.
    """

    def __init__(self, directory: str, fingerprint: str):
        path = os.path.join(directory, META)
        if not os.path.exists(path):
            raise ValueError(f"{directory} holds no encoded pool ({META} missing); build it with build_cache")
        with open(path) as f:
            self.meta = json.load(f)
        _check_encoder(directory, self.meta, fingerprint)
        self.directory, self.size = directory, int(self.meta["pool"]["samples"])
        missing = [s for s in range(math.ceil(self.size / SHARD)) if not os.path.exists(self._shard(s))]
        if missing:
            raise ValueError(f"{directory} is incomplete ({len(missing)} shards missing): run the same command again")
        self._files: dict[int, object] = {}

    def _shard(self, shard: int) -> str:
        return os.path.join(self.directory, f"shard-{shard:05d}.safetensors")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(f"sample {index} of a pool of {self.size}")
        shard = index // SHARD
        if shard not in self._files:
            self._files[shard] = safe_open(self._shard(shard), framework="pt")
        file, prefix = self._files[shard], f"{index}."
        return {k[len(prefix) :]: file.get_tensor(k) for k in file.keys() if k.startswith(prefix)}


@dataclass
class CachedCollator:
    """Collates `CachedPool` samples into what `VQACollator` would give for the same examples, with
    ``image_features`` (one `VisionFeatures` per image) in place of ``pixel_values``: left-padded rows, the
    attention mask, ``image_grid_thw`` and, where the samples have them, ``answer_box`` / ``image_size``."""

    pad_token_id: int

    def __call__(self, samples: list[dict]) -> dict:
        batch = {
            "input_ids": left_pad([s["input_ids"] for s in samples], self.pad_token_id),
            "attention_mask": left_pad([torch.ones_like(s["input_ids"]) for s in samples], 0),
            "labels": left_pad([s["labels"] for s in samples], IGNORE_INDEX),
            "question_mask": left_pad([s["question_mask"] for s in samples], 0),
            "image_grid_thw": torch.stack([s["image_grid_thw"] for s in samples]),
            "image_features": [_features(s) for s in samples],
        }
        if any("answer_box" in s for s in samples):
            batch["answer_box"] = torch.stack([s.get("answer_box", torch.full((4,), -1.0)) for s in samples])
            batch["image_size"] = torch.stack([s.get("image_size", torch.zeros(2, dtype=torch.long)) for s in samples])
        return batch


def _features(sample: dict, prefix: str = "") -> VisionFeatures:
    """A cached sample's `VisionFeatures` (its gist with them, where the pool has gists)."""
    extra = [sample[f"{prefix}extra.{k}"] for k in range(sum(n.startswith(f"{prefix}extra.") for n in sample))]
    features = VisionFeatures(sample[f"{prefix}tokens"], tuple(sample[f"{prefix}grid"].tolist()), extra)
    if not prefix and "gist.tokens" in sample:
        features.gist, features.gist_scale = _features(sample, "gist."), int(sample["gist.scale"])
    return features


def cached_datasets(model, collator, train, valid, directory: str, descriptions: dict[str, dict], args):
    """Encode the training pool (``DIR/train``) and the evaluation pool (``DIR/eval``, if any; ``descriptions``
    per pool name) – on the main process first under DDP – and return them as `CachedPool`s with their
    `CachedCollator`."""
    fingerprint = vision_fingerprint(model.vlm)
    pools = []
    for name, dataset in (("train", train), ("eval", valid)):
        if dataset is None:
            pools.append(None)
            continue
        folder = os.path.join(directory, name)
        with args.main_process_first(desc=f"encoding the {name} pool"):
            if args.should_save:
                build_cache(model, collator, dataset, folder, descriptions[name],
                            batch_size=args.per_device_train_batch_size,
                            saccade=model.config.encoding == "saccade")  # fmt: skip
        pools.append(CachedPool(folder, fingerprint))
    pad = collator.processor.tokenizer.pad_token_id
    return pools[0], pools[1], CachedCollator(pad if pad is not None else 0)
