"""The commands of ``arr-coc``: ``cmd_<command>(args)`` for each; their options and the entry point are in
`arr_coc_cli` (outside this package, so that ``--help`` need not import it). ``python -m arr_coc.cli`` and
`main` run the same command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from arr_coc_cli import main


def _load(model_name: str, encoding: str | None = None, crop_margin: int | None = None, one_encoding: bool = False):
    """The model and processor, with the command's encoding and crop margin; ``one_encoding`` (run, demo: every
    answer uses the model's encoding) refuses a crop margin the single encoding would ignore."""
    import arr_coc

    model = arr_coc.ArrCocForConditionalGeneration.from_pretrained(model_name).eval()
    if encoding:
        model.config.encoding = encoding
    if crop_margin is not None:
        if one_encoding and model.config.encoding != "saccade":
            raise ValueError(f"--crop-margin {crop_margin} applies to the saccade encoding's crops, and this run uses "
                             f"the {model.config.encoding!r} encoding: add --encoding saccade, or drop --crop-margin")  # fmt: skip
        model.config.crop_margin = crop_margin
    model.config.check()
    return model, arr_coc.ArrCocProcessor.from_pretrained(model_name)


def _open_image(path: str):
    from .images import load_image

    return load_image(path, what=f"image {path}")


def cmd_demo(args: argparse.Namespace) -> int:
    """``arr-coc demo``: answer one question about one image and draw where the tokens went."""
    from .data.synthetic import eval_seeds, generate
    from .figures import realization_figure
    from .pipeline import answer

    started = time.time()
    if args.image:
        _check_question(args.question)
        image, question, expected = _open_image(args.image), args.question, None
    else:
        sample = generate(args.task, eval_seeds(1, args.index)[0])
        image, question, expected = sample["image"], args.question or sample["question"], sample["answer"]
    model, processor = _load(args.model, args.encoding, args.crop_margin, one_encoding=True)  # image checked first
    result = answer(model, processor, [image], [question], budget=args.budget, compression=args.compression)[0]
    realization = result["realization"]
    caption = f"Q: {question}   A: {result['answer']}"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    realization_figure(image, realization, caption, knowing_maps=True, expected=expected).save(args.out)
    report = {
        "question": question,
        "answer": result["answer"],
        "expected": expected,
        "tokens_used": result["tokens_used"],
        "native_tokens": result["native_tokens"],
        "budget": realization.budget,
        "requested_budget": realization.requested_budget,
        "budget_clipped": realization.budget_clipped,
        "picture": os.path.abspath(args.out),
        "seconds": round(time.time() - started, 2),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"question: {question}")
        print(f"answer:   {result['answer']}" + (f"   (expected {expected})" if expected is not None else ""))
        print(
            f"tokens:   {result['tokens_used']} of {result['native_tokens']} native visual tokens (budget {realization.budget_text})"
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
    """``arr-coc run``: one image and question, or every row of a JSONL file / folder (sharded across processes
    under torchrun or accelerate launch, merged in input order)."""
    from tqdm.auto import tqdm

    from .figures import realization_figure
    from .pipeline import answer

    if bool(args.image) == bool(args.input):
        raise ValueError("give either --image with --question, or --input (a JSONL file or a folder)")
    if args.image:
        _check_question(args.question)
    rows = [{"id": 0, "image": args.image, "question": args.question}] if args.image else read_inputs(args.input)
    rank, world = _distributed()
    mine = rows[rank::world]
    for row in mine:  # every image this process reads is there and readable before the model loads
        _open_image(row["image"])
    model, processor = _load(args.model, args.encoding, args.crop_margin, one_encoding=True)
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
                      "native_tokens": out["native_tokens"], "budget": out["realization"].budget,
                      "requested_budget": out["realization"].requested_budget,
                      "budget_clipped": out["realization"].budget_clipped}  # fmt: skip
            if "answer" in row:
                record["expected"] = row["answer"]
            budget_text = out["realization"].budget_text  # printed for a single --image
            if args.heatmap and args.image:
                caption = f"Q: {row['question']}   A: {out['answer']}"
                realization_figure(image, out["realization"], caption, expected=row.get("answer")).save(args.heatmap)
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
        print(f"answer: {r['answer']}\ntokens: {r['tokens_used']} of {r['native_tokens']} (budget {budget_text})")
        if args.heatmap:
            print(f"heatmap: {r['heatmap']}")
    else:
        print(f"{len(results)} answers" + (f" written to {args.output}" if args.output else ""))
    return 0


def _check_question(question: str | None) -> None:
    """`ValueError` for --image without --question, or with an empty one."""
    if question is None:
        raise ValueError("--image needs --question")
    if not question.strip():
        raise ValueError("--question is empty: ask something about the image")


def cmd_eval(args: argparse.Namespace) -> int:
    """``arr-coc eval``: methods x budgets x tasks on the same held-out samples; JSON, markdown and plots."""
    from .data import parse_data_spec
    from .evaluation.harness import BUDGETS, METHODS, evaluate, example_allocations, synthetic_samples, write_outputs
    from .relevance import budget_options

    if args.encoding:  # accepted by every command that loads a model; eval's methods each fix their own
        raise ValueError(f"--encoding {args.encoding} is not an option of arr-coc eval: each method fixes its own "
                         "encoding (arr-coc-saccade the saccade, every other method the single encoding); choose the "
                         "methods with --methods, e.g. --methods full,arr-coc-saccade")  # fmt: skip
    methods = METHODS if args.methods == "all" else tuple(m.strip() for m in args.methods.split(","))
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; expected some of {METHODS}")
    budgets = BUDGETS if args.budgets == "all" else tuple(b.strip() for b in args.budgets.split(","))
    for b in budgets:  # checked whatever the methods: an unbudgeted run would print an empty column
        budget_options(b)
    if args.n < 1:
        raise ValueError(f"--n {args.n} is invalid: expected at least 1 sample per task")
    model, processor = _load(args.model, args.encoding, args.crop_margin)
    kind, source = parse_data_spec(args.data)
    notes = []
    if kind == "synthetic":
        samples = synthetic_samples(source, args.n)
    else:
        from .data.vqa import load_vqa

        schema = kind
        rows = load_vqa(schema, source, split=args.split, limit=args.n)
        samples = [dict(r, task=schema, answer_box=None, id=i) for i, r in enumerate(rows)]
        if args.methods == "all":  # the oracle reads each answer's box, which VQA data does not have
            methods = tuple(m for m in methods if m != "oracle")
            notes.append(f"oracle left out: {schema} data has no answer boxes, which the oracle allocation reads")
    result = evaluate(model, processor, samples, methods, budgets, batch_size=args.batch_size,
                      timing_samples=args.timing_n, threads=args.threads, max_new_tokens=args.max_new_tokens,
                      prune_layer=args.prune_layer)  # fmt: skip
    result.notes.extend(notes)
    paths = write_outputs(result, args.out, title=f"{args.model} on {args.data} (n={args.n} per task)")
    paths["examples"] = example_allocations(model, processor, samples, args.out)
    print(open(paths["markdown"]).read() if not args.json else json.dumps(paths))
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    """``arr-coc app``: serve the web app."""
    from .app.app import build_app

    model, processor = _load(args.model, args.encoding, args.crop_margin)
    app = build_app(model, processor, max_bytes=args.max_upload_mb * 2**20, max_pixels=args.max_pixels,
                    concurrency=args.concurrency, queue_size=args.queue_size)  # fmt: skip
    app.launch(server_name=args.host, server_port=args.port, share=False, show_error=True)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``arr-coc export``: the learned heads (.pt2 and ONNX) and/or a remote-code checkpoint."""
    if args.heads:
        import importlib.util

        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(f"exporting the heads to ONNX needs {', '.join(missing)}: pip install 'arr-coc[export]', "
                             "or pass --no-heads (e.g. --no-heads --remote-code for the checkpoint alone)")  # fmt: skip
    model, processor = _load(args.model, args.encoding, args.crop_margin)
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
    """``arr-coc data``: synthetic samples (PNG + JSONL) for people to look at."""
    from .data.synthetic import EVAL_SEED_START, TASKS, write_samples

    tasks = TASKS if args.task == "all" else (args.task,)
    start = EVAL_SEED_START + args.seed_start if args.held_out else args.seed_start
    path = write_samples(args.out, tasks, args.n, start)
    print(path)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """``arr-coc train``: see `arr_coc.training.run`."""
    from .training.run import main_from_args

    return main_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
