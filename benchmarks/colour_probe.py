"""Do a backbone's merged visual tokens keep box-codes' outline colours apart? A linear probe (docs/training.md,
"Colours the vision tower did not keep apart").

Per drawn box, the features are the mean of the merged tokens its outline crosses and the maximum over every token
of the box; a linear classifier (Adam, full batch) is fit on the boxes of ``--train-images`` training-seed images and
scored on the boxes of ``--test-images`` held-out validation images (seeds from offset 1000, as heads_study's
``--offset 1000``). A probe that cannot fit its own training set means the colour is gone from the tokens.

    python benchmarks/colour_probe.py --model arr-coc-tiny --train-images 1500
    python benchmarks/colour_probe.py --run runs/tiny2 --train-images 300     # a backbone run's checkpoint
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

import arr_coc
from arr_coc.data.boxes import box_overlap_map
from arr_coc.data.synthetic import PALETTE, eval_seeds, generate

TRAIN_SEED_START = 5000  # training seeds (the generator's own range; never the held-out ones)


def box_features(model, processor, seeds, batch_size: int = 8) -> tuple[torch.Tensor, list[str]]:
    """Per box of the box-codes images of ``seeds``: [outline tokens' mean | box tokens' max] [n, 2d], colours."""
    features, colours = [], []
    samples = [generate("box-codes", seed, layout=True) for seed in seeds]
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        inputs = processor(images=[s["image"] for s in chunk], text=[s["question"] for s in chunk])
        with torch.no_grad():
            encoded = model.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])
        for sample, f in zip(chunk, encoded):
            _, h, w = f.grid
            tokens = f.tokens.float().reshape(h, w, -1)
            for item in sample["items"]:
                x0, y0, x1, y1 = item["box"]
                outer = box_overlap_map(item["box"], sample["image"].size, (h, w)) > 0
                inner = box_overlap_map((x0 + 14, y0 + 14, x1 - 14, y1 - 14), sample["image"].size, (h, w)) >= 0.99
                features.append(torch.cat([tokens[outer & ~inner].mean(0), tokens[outer].max(0).values]))
                colours.append(item["colour"])
    return torch.stack(features), colours


def probe(train: tuple[torch.Tensor, list[str]], test: tuple[torch.Tensor, list[str]], steps: int = 600) -> dict:
    """Fit the linear probe on ``train`` and score it on both; the most frequent held-out confusions."""
    torch.manual_seed(0)
    names = list(PALETTE)
    (x_train, c_train), (x_test, c_test) = train, test
    y_train, y_test = (torch.tensor([names.index(c) for c in cs]) for cs in (c_train, c_test))
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    linear = torch.nn.Linear(x_train.shape[1], len(names))
    optimizer = torch.optim.Adam(linear.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(x_train), y_train).backward()
        optimizer.step()
    with torch.no_grad():
        predicted = linear(x_test).argmax(-1)
        fit = (linear(x_train).argmax(-1) == y_train).float().mean().item()
    confusions = collections.Counter(
        f"{names[a]} -> {names[b]}" for a, b in zip(y_test.tolist(), predicted.tolist()) if a != b
    )
    return {"train_boxes": len(c_train), "test_boxes": len(c_test), "train_accuracy": round(fit, 3),
            "test_accuracy": round((predicted == y_test).float().mean().item(), 3),
            "confusions": dict(confusions.most_common(8))}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="an arr-coc model (e.g. arr-coc-tiny)")
    source.add_argument("--run", help="a backbone run of `python -m arr_coc.tiny train` (its checkpoint)")
    p.add_argument("--train-images", type=int, default=300)
    p.add_argument("--test-images", type=int, default=150)
    p.add_argument("--out", default=None, help="a JSON file for the result")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.run:
        from arr_coc.tiny.train import load_run

        model = arr_coc.ArrCocForConditionalGeneration.from_backbone(load_run(args.run)[0].eval())
    else:
        model = arr_coc.ArrCocForConditionalGeneration.from_pretrained(args.model).eval()
    processor = arr_coc.ArrCocProcessor.from_pretrained("arr-coc-tiny" if args.run else args.model)
    train = box_features(model, processor, range(TRAIN_SEED_START, TRAIN_SEED_START + args.train_images))
    test = box_features(model, processor, eval_seeds(args.test_images, 1000))
    result = {"source": args.run or args.model, **probe(train, test)}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
