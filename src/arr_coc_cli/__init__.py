"""``arr-coc``: the command line's options and dispatch, apart from the ``arr_coc`` package.

Importing ``arr_coc`` registers the model with transformers' Auto classes, which imports transformers' model
code (seconds). ``arr-coc --help`` needs none of it, and Python runs a package's ``__init__`` before any of its
modules, so the console entry point lives here, outside that package: the options are parsed (and ``--help``
answered) with the standard library only, then the command runs from `arr_coc.cli`.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_MODEL = "arr-coc-tiny"


def output_dir() -> str:
    """Where commands write what the caller did not place (the demo's picture, eval results, a training run):
    ``$ARR_COC_OUTPUT``, else ``arr-coc`` in the user's cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``) –
    never the working directory, which is often a checkout."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("ARR_COC_OUTPUT") or os.path.join(cache, "arr-coc")


EVAL_ENCODING = (
    "refused: each method fixes its own encoding (arr-coc-saccade the saccade, every other the single "
    "encoding) – pick them with --methods"
)


def _model_arg(parser: argparse.ArgumentParser, encoding_help: str | None = None) -> None:
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="an arr-coc model: 'arr-coc-tiny', a local folder or a Hub id"
    )
    parser.add_argument(
        "--encoding", choices=("single", "saccade"), default=None,
        help=encoding_help or "'single': encode the whole image, then compress; 'saccade': encode a gist, then only the "
        "regions that matter at full resolution (saves encoder time). Default: the model's config",
    )  # fmt: skip
    parser.add_argument(
        "--crop-margin", type=int, default=None,
        help="saccade: merged cells (28 px on Qwen2-VL) of context encoded around each crop and dropped after the "
        "encoder. Default: the model's config",
    )  # fmt: skip


def _budget_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--budget", type=int, help="visual tokens per image (default: the model picks, in [min_tokens, max_tokens])"
    )
    group.add_argument(
        "--compression", type=float, help="a ratio of the native token count: budget = ceil(native / ratio)"
    )


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a YAML file with any of these options (the command line wins)")
    p.add_argument("--model", default=None, help="an arr-coc model (folder, Hub id or 'arr-coc-tiny') to train")
    p.add_argument("--backbone", default=None, help="or a stock Qwen2-VL-family backbone to wrap with fresh heads")
    p.add_argument(
        "--encoding", choices=("single", "saccade"), default=None,
        help="train the heads for this encoding (saccade: relevance on the gist; see --saccade-heads)",
    )  # fmt: skip
    p.add_argument(
        "--saccade-heads", action="store_true", default=None,
        help="with --encoding saccade: train heads of the saccade's own (started from the single encoding's, which stay "
        "as they are; config saccade_heads) – a model that has them trains them with --encoding saccade anyway",
    )  # fmt: skip
    p.add_argument(
        "--relevance-spread", type=int, default=None,
        help="train (and save) the model with this shaping of the allocator's input: tokens per side a relevance peak "
        "spreads over (config relevance_spread; default: the model's own)",
    )  # fmt: skip
    p.add_argument(
        "--relevance-floor",
        type=float,
        default=None,
        help="train (and save) the model with the allocator reading 0 below this share of the image's largest "
        "relevance, in [0, 1), 0 = off (config relevance_floor; default: the model's own)",
    )
    p.add_argument(
        "--output-dir", default=None, help=f"checkpoints, logs and the final model (default: {output_dir()}/train)"
    )
    p.add_argument(
        "--data",
        default=None,
        help="'synthetic' (both tasks), 'synthetic:box-codes', or SCHEMA:SOURCE with SCHEMA in vqav2/textvqa/docvqa/chartqa",
    )
    p.add_argument(
        "--train-samples", type=int, default=None, help="training examples (synthetic: per task; VQA: a limit)"
    )
    p.add_argument("--eval-samples", type=int, default=None, help="evaluation examples (0: no evaluation)")
    p.add_argument("--objectives", default=None, help="weights, e.g. 'answer=1,localise=1,distill=0.5,budget=0.1'")
    p.add_argument(
        "--budget",
        default=None,
        help="training budgets: 'random' (ratios in --compression-range), 'auto', an int, or '1/8'",
    )
    p.add_argument(
        "--compression-range", default=None, help="'2,16': log-uniform compression ratios for --budget random"
    )
    p.add_argument(
        "--train-parts",
        default=None,
        help="comma-separated parts to train (default: the heads the run's encoding reads – relevance, or "
        "saccade_relevance in a saccade run of a model with saccade heads); see training/surgery.py",
    )
    p.add_argument("--part-lr", default=None, help="per-part learning rates, e.g. 'relevance=1e-3,language_model=1e-5'")
    p.add_argument(
        "--layer-decay", type=float, default=None, help="layer-wise learning-rate decay for the language model"
    )
    p.add_argument(
        "--lora-r", type=int, default=None, help="add LoRA of this rank to the language model's q/v projections"
    )
    p.add_argument(
        "--lm-lora", default=None, metavar="SPEC",
        help="train a fresh LoRA on the language model that is on only for samples whose sequence holds a pooled visual "
        "token (a budget >= native stays the stock backbone), e.g. 'r=8' or 'r=8,alpha=16,dropout=0,targets=q_proj+v_proj'",
    )  # fmt: skip
    p.add_argument(
        "--vision-lora", default=None, metavar="SPEC",
        help="train a fresh LoRA on the vision tower that is on only for saccade passes (the single encoding stays the "
        "stock encoder), e.g. 'r=8' (targets default: qkv+proj); with --encoding saccade or the consistency objective",
    )  # fmt: skip
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--per-device-train-batch-size", type=int, default=None)
    p.add_argument("--gradient-accumulation-steps", type=int, default=None)
    p.add_argument("--save-steps", type=int, default=None)
    p.add_argument("--eval-steps", type=int, default=None)
    p.add_argument("--logging-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--resume", default=None, help="'auto' (the latest checkpoint in --output-dir) or a checkpoint folder"
    )
    p.add_argument(
        "--save-heads-only",
        action="store_true",
        default=None,
        help="also write only the heads (small, names the backbone)",
    )
    p.add_argument("--report-to", default=None, help="'none', 'tensorboard', 'wandb' (when installed)")
    p.add_argument("--push-to-hub", action="store_true", default=None)
    p.add_argument("--hub-model-id", default=None)
    p.add_argument("--use-cpu", action="store_true", default=None, help="train on the CPU even where a GPU is present")
    p.add_argument(
        "--cache-encoder", default=None, metavar="DIR",
        help="encode the training (and evaluation) pool once with the frozen vision encoder into DIR (resumable, "
        "tied to the encoder's weights) and train on those outputs: the encoder never runs in a training step",
    )  # fmt: skip


# `arr-coc eval --help` names these without importing arr_coc (tests/test_cli.py checks them against the registry)
EVAL_METHODS = ("full", "downsample", "uniform-pool", "random", "query-agnostic", "text-attention", "cdpruner",
                "divprune", "dart", "pixelprune", "pixelprune-tol", "low-res-first", "arr-coc-free", "arr-coc",
                "arr-coc-auto", "oracle", "arr-coc-saccade")  # fmt: skip
EVAL_BUDGETS = ("1/2", "1/4", "1/8", "1/16", "64", "100", "256", "400")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arr-coc", description="Query-aware visual token budgets for Qwen2-VL-family models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("run", help="answer a question about an image, or a JSONL file / folder of them",
                       description="Answer one question about one image, or every row of a JSONL file / folder "
                       "(sharded across processes under torchrun or accelerate launch, merged in input order).")  # fmt: skip
    _model_arg(p)
    p.add_argument("--image", help="an image file")
    p.add_argument("--question", help="the question about --image")
    p.add_argument("--input", help="a JSONL file (image, question[, id, answer] per line) or a folder")
    p.add_argument("--output", help="write one JSON result per line here")
    _budget_args(p)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--heatmap", help="with --image: write the relevance heatmap and allocation here (PNG)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("demo", help="answer a held-out sample (or your image) with arr-coc-tiny and draw the allocation",
                       description="Answer one question about one image and draw where the tokens went.")  # fmt: skip
    _model_arg(p)
    p.add_argument("--image", help="an image file (default: render a held-out synthetic sample)")
    p.add_argument("--question", help="the question (default: the sample's own)")
    p.add_argument(
        "--task", default="doc-fields", choices=["box-codes", "doc-fields"], help="which synthetic task to render"
    )
    p.add_argument("--index", type=int, default=0, help="which held-out sample to render")
    _budget_args(p)
    p.add_argument("--out", default=os.path.join(output_dir(), "demo.png"),
                   help="where to write the picture (PNG; default: %(default)s, set by ARR_COC_OUTPUT)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    p = sub.add_parser("train", help="train the relevance heads (transformers.Trainer; torchrun/accelerate ready)",
                       description="Train the relevance heads (and whatever else you unfreeze) with transformers' "
                       "Trainer. Options come from the command line and/or a YAML file (same names, dashes or "
                       "underscores). Runs as it is on one process, or under torchrun --nproc_per_node N / "
                       "accelerate launch (DDP).")  # fmt: skip
    _train_args(p)

    p = sub.add_parser("eval", help="accuracy kept per token budget, arr-coc against every baseline, in one run",
                       description="Methods x budgets x tasks on the same held-out samples: JSON, a markdown table "
                       "and plots.")  # fmt: skip
    _model_arg(p, encoding_help=EVAL_ENCODING)
    p.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic', 'synthetic:box-codes', or SCHEMA:SOURCE (vqav2/textvqa/docvqa/chartqa)",
    )
    p.add_argument("--split", default="validation", help="the split of a VQA data set")
    p.add_argument("--n", type=int, default=50, help="samples per task (held-out seeds for the synthetic tasks)")
    p.add_argument(
        "--methods",
        default="all",
        help="comma-separated names of registered methods, or 'all' (default): " + ", ".join(EVAL_METHODS)
        + " (what each keeps: docs/benchmarks.md's method table)",
    )  # fmt: skip
    p.add_argument(
        "--budgets", default="all",
        help="comma-separated: fractions like 1/8 of native and/or token counts like 64, or 'all' (default): "
        + ",".join(EVAL_BUDGETS),
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument(
        "--prune-layer",
        type=int,
        default=None,
        help="the language-model layer K where text-attention and dart prune (default 2; 1 for 2-3 layer models)",
    )
    p.add_argument(
        "--timing-n", type=int, default=3,
        help="per task, the first N samples are also run one at a time for each method's median time to first token "
        "(0: no timing)",
    )  # fmt: skip
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch's intra-op threads for the run (default 1: the small evaluation ops gain nothing from more, and "
        "a shared machine's busy cores stall them; 0: torch's default)",
    )  # fmt: skip
    p.add_argument("--out", default=os.path.join(output_dir(), "eval-results"),
                   help="output folder: results.json, results.md, plots (default: %(default)s, set by ARR_COC_OUTPUT)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the output paths as JSON instead of the table")

    p = sub.add_parser("app", help="serve the web app (Gradio) on 127.0.0.1",
                       description="Serve the web app: upload an image, ask, and see the relevance heatmap and the "
                       "allocation.")  # fmt: skip
    _model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--concurrency", type=int, default=2, help="requests answered at once; the rest wait in the queue")
    p.add_argument("--queue-size", type=int, default=64, help="requests that may wait before new ones are refused")
    p.add_argument("--max-upload-mb", type=int, default=10, help="largest accepted upload")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest accepted image (width x height)")

    p = sub.add_parser("export", help="export the relevance heads (torch.export, ONNX) and/or a remote-code checkpoint",
                       description="Export the learned relevance heads (torch.export .pt2 and ONNX with dynamic "
                       "sizes), and/or write the model as a remote-code checkpoint that loads without arr-coc "
                       "installed.")  # fmt: skip
    _model_arg(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--heads", action=argparse.BooleanOptionalAction, default=True, help="export the learned heads (default on)"
    )
    p.add_argument("--remote-code", action="store_true", help="also write a checkpoint with flat code and auto_map")

    p = sub.add_parser("data", help="write synthetic task samples (PNG + JSONL)",
                       description="Write synthetic samples (PNG + JSONL) for people to look at.")  # fmt: skip
    p.add_argument("--task", default="all", choices=["all", "box-codes", "doc-fields"])
    p.add_argument("--n", type=int, default=10, help="samples per task")
    p.add_argument("--seed-start", type=int, default=0, help="first seed")
    p.add_argument("--held-out", action="store_true", help="use the held-out evaluation seeds")
    p.add_argument("--out", required=True, help="output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (``--help`` answers here), then run ``arr_coc.cli.cmd_<command>``. Exit status 2 with
    ``arr-coc <command>: error: ...`` on stderr for bad input (`ValueError`, `FileNotFoundError`, `OSError`)."""
    args = build_parser().parse_args(argv)
    try:
        from arr_coc import cli

        return getattr(cli, f"cmd_{args.command}")(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"arr-coc {args.command}: error: {error}", file=sys.stderr)
        return 2
