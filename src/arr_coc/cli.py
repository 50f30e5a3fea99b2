"""``arr-coc``: the command line. ``arr-coc <command> --help`` explains each command's options."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_MODEL = "arr-coc-tiny"


def _model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="an arr-coc model: 'arr-coc-tiny', a local folder or a Hub id"
    )
    parser.add_argument(
        "--encoding", choices=("single", "saccade"), default=None,
        help="'single': encode the whole image, then compress; 'saccade': encode a gist, then only the regions "
        "that matter at full resolution (saves encoder time). Default: the model's config",
    )  # fmt: skip


def _budget_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--budget", type=int, help="visual tokens per image (default: the model picks, in [min_tokens, max_tokens])"
    )
    group.add_argument(
        "--compression", type=float, help="a ratio of the native token count: budget = ceil(native / ratio)"
    )


def _load(model_name: str, encoding: str | None = None):
    import arr_coc

    model = arr_coc.ArrCocForConditionalGeneration.from_pretrained(model_name).eval()
    if encoding:
        model.config.encoding = encoding
        model.config.check()
    return model, arr_coc.ArrCocProcessor.from_pretrained(model_name)


def _open_image(path: str):
    from .images import load_image

    return load_image(path, what=f"image {path}")


def cmd_demo(args: argparse.Namespace) -> int:
    """Answer one question about one image and draw where the tokens went."""
    from .data.synthetic import eval_seeds, generate
    from .figures import realization_figure
    from .pipeline import answer

    started = time.time()
    model, processor = _load(args.model, args.encoding)
    if args.image:
        if not args.question:
            raise SystemExit("arr-coc demo: --image needs --question")
        image, question, expected = _open_image(args.image), args.question, None
    else:
        sample = generate(args.task, eval_seeds(1, args.index)[0])
        image, question, expected = sample["image"], args.question or sample["question"], sample["answer"]
    result = answer(model, processor, [image], [question], budget=args.budget, compression=args.compression)[0]
    realization = result["realization"]
    caption = f"Q: {question}   A: {result['answer']}"
    realization_figure(image, realization, caption, knowing_maps=True).save(args.out)
    report = {
        "question": question,
        "answer": result["answer"],
        "expected": expected,
        "tokens_used": result["tokens_used"],
        "native_tokens": result["native_tokens"],
        "budget": realization.budget,
        "picture": os.path.abspath(args.out),
        "seconds": round(time.time() - started, 2),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"question: {question}")
        print(f"answer:   {result['answer']}" + (f"   (expected {expected})" if expected is not None else ""))
        print(
            f"tokens:   {result['tokens_used']} of {result['native_tokens']} native visual tokens (budget {realization.budget})"
        )
        print(f"picture:  {report['picture']}")
    return 0


def read_inputs(source: str) -> list[dict]:
    """Rows {"image": path, "question": str, ...} from a JSONL file or a folder (its .jsonl, or image + same-named .txt)."""
    if os.path.isdir(source):
        jsonl = sorted(f for f in os.listdir(source) if f.endswith(".jsonl"))
        if jsonl:
            return read_inputs(os.path.join(source, jsonl[0]))
        rows = []
        for name in sorted(os.listdir(source)):
            stem, ext = os.path.splitext(name)
            txt = os.path.join(source, stem + ".txt")
            if ext.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif") and os.path.isfile(txt):
                with open(txt, encoding="utf-8") as f:
                    rows.append({"id": stem, "image": os.path.join(source, name), "question": f.read().strip()})
        if not rows:
            raise ValueError(f"{source}: no .jsonl file and no image with a same-named .txt question")
        return rows
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: no such file or folder")
    root, rows = os.path.dirname(os.path.abspath(source)), []
    with open(source, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source}:{n}: not JSON ({error.msg})") from None
            if not isinstance(row, dict) or "image" not in row or not isinstance(row.get("question"), str):
                raise ValueError(f'{source}:{n}: each line needs "image" (a path) and "question" (a string)')
            row.setdefault("id", n - 1)
            row["image"] = row["image"] if os.path.isabs(row["image"]) else os.path.join(root, row["image"])
            rows.append(row)
    return rows


def _distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun / accelerate launch, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return dist.get_rank(), world
    return 0, 1


def cmd_run(args: argparse.Namespace) -> int:
    """Answer one question about one image, or every row of a JSONL file / folder (sharded across
    processes under torchrun or accelerate launch, merged in input order)."""
    from tqdm.auto import tqdm

    from .figures import realization_figure
    from .pipeline import answer

    if bool(args.image) == bool(args.input):
        raise ValueError("give either --image with --question, or --input (a JSONL file or a folder)")
    if args.image and not args.question:
        raise ValueError("--image needs --question")
    rows = [{"id": 0, "image": args.image, "question": args.question}] if args.image else read_inputs(args.input)
    rank, world = _distributed()
    mine = rows[rank::world]
    model, processor = _load(args.model, args.encoding)
    results = []
    for start in tqdm(
        range(0, len(mine), args.batch_size), desc=f"run (rank {rank}/{world})", disable=args.json or len(mine) <= 1
    ):
        batch = mine[start : start + args.batch_size]
        images = [_open_image(r["image"]) for r in batch]
        outs = answer(
            model, processor, images, [r["question"] for r in batch], args.budget, args.compression, args.max_new_tokens
        )
        for row, image, out in zip(batch, images, outs):
            record = {"id": row["id"], "question": row["question"], "answer": out["answer"], "tokens_used": out["tokens_used"],
                      "native_tokens": out["native_tokens"], "budget": out["realization"].budget}  # fmt: skip
            if "answer" in row:
                record["expected"] = row["answer"]
            if args.heatmap and args.image:
                realization_figure(image, out["realization"], f"Q: {row['question']}   A: {out['answer']}").save(
                    args.heatmap
                )
                record["heatmap"] = os.path.abspath(args.heatmap)
            results.append(record)
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        order = {row["id"]: i for i, row in enumerate(rows)}
        results = sorted((r for part in gathered for r in part), key=lambda r: order[r["id"]])
        if rank != 0:
            return 0
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    if args.json:
        print(json.dumps(results[0] if args.image else results))
    elif args.image:
        r = results[0]
        print(f"answer: {r['answer']}\ntokens: {r['tokens_used']} of {r['native_tokens']} (budget {r['budget']})")
        if args.heatmap:
            print(f"heatmap: {r['heatmap']}")
    else:
        print(f"{len(results)} answers" + (f" written to {args.output}" if args.output else ""))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Methods x budgets x tasks on the same held-out samples: JSON, a markdown table and plots."""
    from .data import parse_data_spec
    from .evaluation.harness import BUDGETS, METHODS, evaluate, example_allocations, synthetic_samples, write_outputs

    model, processor = _load(args.model, args.encoding)
    methods = METHODS if args.methods == "all" else tuple(m.strip() for m in args.methods.split(","))
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; expected some of {METHODS}")
    budgets = BUDGETS if args.budgets == "all" else tuple(b.strip() for b in args.budgets.split(","))
    kind, source = parse_data_spec(args.data)
    if kind == "synthetic":
        samples = synthetic_samples(source, args.n)
    else:
        from .data.vqa import load_vqa

        schema = kind
        rows = load_vqa(schema, source, split=args.split, limit=args.n)
        samples = [dict(r, task=schema, answer_box=None, id=i) for i, r in enumerate(rows)]
    result = evaluate(model, processor, samples, methods, budgets, batch_size=args.batch_size,
                      timing_samples=args.timing_n, threads=args.threads, max_new_tokens=args.max_new_tokens,
                      prune_layer=args.prune_layer)  # fmt: skip
    paths = write_outputs(result, args.out, title=f"{args.model} on {args.data} (n={args.n} per task)")
    paths["examples"] = example_allocations(model, processor, samples, args.out)
    print(open(paths["markdown"]).read() if not args.json else json.dumps(paths))
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    """Serve the web app: upload an image, ask, and see the relevance heatmap and the allocation."""
    from .app.app import build_app

    model, processor = _load(args.model, args.encoding)
    app = build_app(model, processor, max_bytes=args.max_upload_mb * 2**20, max_pixels=args.max_pixels,
                    concurrency=args.concurrency, queue_size=args.queue_size)  # fmt: skip
    app.launch(server_name=args.host, server_port=args.port, share=False, show_error=True)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export the learned relevance heads (torch.export .pt2 and ONNX with dynamic sizes), and/or write
    the model as a remote-code checkpoint that loads without arr-coc installed."""
    model, processor = _load(args.model, args.encoding)
    report = {}
    if args.heads:
        from .export import export_heads

        report["heads"] = export_heads(model, args.out)
    if args.remote_code:
        folder = os.path.join(args.out, "remote-code")
        model.save_pretrained(folder, remote_code=True)
        processor.save_pretrained(folder, remote_code=True)
        report["remote_code"] = os.path.abspath(folder)
    print(json.dumps(report, indent=1))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Write synthetic samples (PNG + JSONL) for people to look at."""
    from .data.synthetic import EVAL_SEED_START, TASKS, write_samples

    tasks = TASKS if args.task == "all" else (args.task,)
    start = EVAL_SEED_START + args.seed_start if args.held_out else args.seed_start
    path = write_samples(args.out, tasks, args.n, start)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arr-coc", description="Query-aware visual token budgets for Qwen2-VL-family models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("run", help="answer a question about an image, or a JSONL file / folder of them",
                       description=cmd_run.__doc__)  # fmt: skip
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
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="answer a held-out sample (or your image) with arr-coc-tiny and draw the allocation",
                       description=cmd_demo.__doc__)  # fmt: skip
    _model_arg(p)
    p.add_argument("--image", help="an image file (default: render a held-out synthetic sample)")
    p.add_argument("--question", help="the question (default: the sample's own)")
    p.add_argument(
        "--task", default="doc-fields", choices=["box-codes", "doc-fields"], help="which synthetic task to render"
    )
    p.add_argument("--index", type=int, default=0, help="which held-out sample to render")
    _budget_args(p)
    p.add_argument("--out", default="arr-coc-demo.png", help="where to write the picture (PNG)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=cmd_demo)

    from .training.run import __doc__ as train_doc
    from .training.run import add_arguments, main_from_args

    p = sub.add_parser("train", help="train the relevance heads (transformers.Trainer; torchrun/accelerate ready)",
                       description=train_doc, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(p)
    p.set_defaults(func=main_from_args)

    p = sub.add_parser("eval", help="accuracy kept per token budget, arr-coc against every baseline, in one run",
                       description=cmd_eval.__doc__)  # fmt: skip
    _model_arg(p)
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
        help="comma-separated names of the registered methods (docs/benchmarks.md's method table), or 'all'",
    )
    p.add_argument(
        "--budgets", default="all", help="comma-separated: fractions like 1/8 of native and/or token counts like 64"
    )
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
    p.add_argument("--out", default="eval-results", help="output folder (results.json, results.md, plots)")
    p.add_argument("--json", action="store_true", help="print the output paths as JSON instead of the table")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("app", help="serve the web app (Gradio) on 127.0.0.1", description=cmd_app.__doc__)
    _model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--concurrency", type=int, default=2, help="requests answered at once; the rest wait in the queue")
    p.add_argument("--queue-size", type=int, default=64, help="requests that may wait before new ones are refused")
    p.add_argument("--max-upload-mb", type=int, default=10, help="largest accepted upload")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest accepted image (width x height)")
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("export", help="export the relevance heads (torch.export, ONNX) and/or a remote-code checkpoint",
                       description=cmd_export.__doc__)  # fmt: skip
    _model_arg(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--heads", action=argparse.BooleanOptionalAction, default=True, help="export the learned heads (default on)"
    )
    p.add_argument("--remote-code", action="store_true", help="also write a checkpoint with flat code and auto_map")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("data", help="write synthetic task samples (PNG + JSONL)", description=cmd_data.__doc__)
    p.add_argument("--task", default="all", choices=["all", "box-codes", "doc-fields"])
    p.add_argument("--n", type=int, default=10, help="samples per task")
    p.add_argument("--seed-start", type=int, default=0, help="first seed")
    p.add_argument("--held-out", action="store_true", help="use the held-out evaluation seeds")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"arr-coc {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
