"""``python -m arr_coc.tiny``: build arr-coc-tiny – tokenizer, backbone curriculum, export with its model card.

One command per step; every training call resumes from the run's last checkpoint, with the schedule the stage was
started with::

    python -m arr_coc.tiny init      --run runs/tiny                    # tokenizer + untrained backbone
    python -m arr_coc.tiny init-from --run runs/tiny --model arr-coc-tiny  # or continue from a shipped backbone
    python -m arr_coc.tiny train     --run runs/tiny --stage native --steps 3000 --lr 2e-4 --decay
    python -m arr_coc.tiny train     --run runs/tiny --stage native       # continue after a stop (same schedule)
    python -m arr_coc.tiny grow      --run runs/tiny --vision-depth 6 --vision-mlp-ratio 4  # more capacity, same function
    python -m arr_coc.tiny cache     --run runs/tiny --stage select --n 4000   # encode a pool once (vision frozen)
    python -m arr_coc.tiny train     --run runs/tiny --stage select --steps 2000 --lr 2e-4 --decay
    python -m arr_coc.tiny evaluate  --run runs/tiny --n 200 --held-out
    python -m arr_coc.tiny curves    --run runs/tiny --out docs/results/tiny_curves.png
    python -m arr_coc.tiny export    --run runs/tiny --out src/arr_coc/assets/arr-coc-tiny --heads runs/tiny-heads
    python -m arr_coc.tiny ship-heads --model src/arr_coc/assets/arr-coc-tiny --heads runs/tiny-budget \
        --notes-file heads.md                                # new heads on the shipped backbone
"""

from __future__ import annotations

import argparse
import json

from ..configuration_arr_coc import parse_settings
from .data import STAGES

# The one command a lent GPU runs (about 9 minutes of training; no exploration on the GPU): the `native` stage
# from the run's weights, 14 processes rendering data. docs/training.md shows it with the commands around it.
GPU_COMMAND = (
    "python -m arr_coc.tiny train --run {run} --stage native --new-schedule --steps 100000 --batch-size 32 "
    "--lr 3e-4 --head-lr 3e-3 --warmup 200 --head-warmup 100 --decay --time-limit 540 --eval-every 0 "
    "--device cuda --workers 14"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m arr_coc.tiny", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("init", help="train the tokenizer and write an untrained backbone")
    p.add_argument("--run", required=True)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("ship-heads", help="put newly trained relevance heads on an exported model (backbone kept)")
    p.add_argument("--model", required=True, help="the exported model folder (e.g. src/arr_coc/assets/arr-coc-tiny)")
    p.add_argument("--heads", required=True, help="an arr-coc model or heads-only folder with the trained heads")
    p.add_argument("--notes-file", required=True, help="markdown for the model card: how they were trained, measured")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="an ArrCocConfig field to ship with them (a JSON value or a bare word), e.g. --set max_tokens=512 --set budget_confidence=0.8")  # fmt: skip
    p = sub.add_parser("init-from", help="start a run from an exported arr-coc model's backbone (new dense head)")
    p.add_argument("--run", required=True)
    p.add_argument("--model", default="arr-coc-tiny")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser(
        "grow", help="deepen / widen the run's vision tower, computing the same function (more capacity)"
    )
    p.add_argument("--run", required=True)
    p.add_argument(
        "--vision-depth", type=int, required=True, help="vision blocks after growing (new ones pass through)"
    )
    p.add_argument("--vision-mlp-ratio", type=int, required=True, help="the blocks' MLP width over embed_dim")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("train", help="train one curriculum stage (resumes from the run's checkpoint and schedule)")
    p.add_argument("--run", required=True)
    p.add_argument("--stage", choices=list(STAGES), required=True)
    schedule = p.add_argument_group("schedule (fixed when the stage starts; leave out to continue it)")
    schedule.add_argument("--steps", type=int, help="optimizer steps of the schedule")
    schedule.add_argument("--lr", type=float, help="peak learning rate (default 5e-4)")
    schedule.add_argument("--head-lr", type=float, help="the dense head's peak learning rate (default: --lr)")
    schedule.add_argument("--warmup", type=int, help="linear warmup steps (default 300)")
    schedule.add_argument("--decay", action="store_true", default=None,
                          help="decay the learning rate linearly to 0 by the end of the steps or the time limit")  # fmt: skip
    schedule.add_argument("--time-limit", type=float, help="training seconds of the schedule, over all calls")
    schedule.add_argument("--batch-size", type=int, help="samples per step (default: the stage's)")
    schedule.add_argument("--head-warmup", type=int, help="first steps train only the dense head")
    p.add_argument("--new-schedule", action="store_true", help="start a new schedule from the current weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workers", type=int, default=1, help="processes rendering the data ahead of the model")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--save-minutes", type=float, default=8.0, help="also checkpoint when this many minutes passed")
    p.add_argument("--eval-every", type=int, default=1000)
    p = sub.add_parser("cache", help="encode a stage's pool once for a stage whose vision encoder is frozen")
    p.add_argument("--run", required=True)
    p.add_argument("--stage", choices=[name for name, spec in STAGES.items() if spec.cached], required=True)
    p.add_argument("--n", type=int, required=True, help="samples in the pool")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p = sub.add_parser("export", help="write the backbone (+ trained heads) as an arr-coc model folder")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--heads", default=None, help="an arr-coc model or heads-only folder whose relevance heads to ship")
    p.add_argument("--eval-n", type=int, default=200, help="held-out samples per task and condition for the card")
    p.add_argument("--commands", default="", help="the training commands to print in the model card")
    p.add_argument("--notes", default="", help="notes on the run to print under the model card's stage table")
    p = sub.add_parser("measure", help="re-measure an exported model's reading accuracy (heldout_accuracy.json, card)",
                       description="Re-measure an exported model's reading with every visual token on the held-out "
                       "seeds (every condition: scales, crops, the second generator) and OVERWRITE the folder's "
                       "heldout_accuracy.json and its card's reading table; about 6 min at --eval-n 200 on one thread.")  # fmt: skip
    p.add_argument("--model", required=True, help="the exported model folder")
    p.add_argument(
        "--eval-n", type=int, default=200, help="held-out samples per task and condition, >= 40 (default 200)"
    )
    p = sub.add_parser("curves", help="plot the run's learning curves to a PNG")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("evaluate", help="exact match per task on validation or held-out seeds")
    p.add_argument("--run", required=True)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--held-out", action="store_true", help="held-out seeds, every condition (scales, crops)")
    p.add_argument("--device", default="cpu")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.cmd == "init":
        from .train import init_run

        init_run(args.run, args.seed)
    elif args.cmd == "init-from":
        from .train import init_from_model

        init_from_model(args.run, args.model, args.seed)
    elif args.cmd == "grow":
        from .train import grow_run

        try:
            print(grow_run(args.run, args.vision_depth, args.vision_mlp_ratio, args.seed))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    elif args.cmd == "train":
        from .train import Schedule, train

        fields = [f for f in Schedule.__dataclass_fields__ if not f.startswith("start_")]
        try:
            train(args.run, args.stage, {f: getattr(args, f) for f in fields}, new_schedule=args.new_schedule,
                  seed=args.seed, device=args.device, save_every=args.save_every, save_minutes=args.save_minutes,
                  eval_every=args.eval_every, threads=args.threads, workers=args.workers)  # fmt: skip
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        except KeyboardInterrupt:  # stopped: the closing line above says where the run stands, no traceback
            raise SystemExit(130) from None
    elif args.cmd == "cache":
        from .cached import build_cache

        print(build_cache(args.run, args.stage, args.n, seed=args.seed, device=args.device))
    elif args.cmd == "export":
        from .card import export_model

        try:
            print(export_model(args.run, args.out, args.heads, args.eval_n, args.commands, args.notes))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    elif args.cmd == "measure":
        from .card import measure_model

        try:
            print(f"wrote {measure_model(args.model, args.eval_n)}/heldout_accuracy.json and its card's reading table")
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    elif args.cmd == "ship-heads":
        from .card import ship_heads

        try:
            print(ship_heads(args.model, args.heads, open(args.notes_file).read(), parse_settings(args.set)))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    elif args.cmd == "curves":
        from .card import plot_curves

        print(plot_curves(args.run, args.out))
    else:
        from .evaluate import VALID_SEED_START, evaluate_model, reading_report
        from .train import load_run

        model, _, tokenizer, image_processor, _, _ = load_run(args.run, args.device)
        if args.held_out:
            result = reading_report(model, tokenizer, image_processor, n=args.n, device=args.device)
        else:
            result = evaluate_model(model, tokenizer, image_processor, n=args.n, seeds_from=VALID_SEED_START,
                                    device=args.device)  # fmt: skip
        print(json.dumps(result))


if __name__ == "__main__":
    main()
