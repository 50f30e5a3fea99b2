"""``arr-coc train``: one command over `transformers.Trainer` for the relevance heads (and whatever else you
unfreeze). Options (`arr_coc_cli`) come from the command line and/or a YAML file (same names, dashes or
underscores).

Runs as it is on one process, or under ``torchrun --nproc_per_node N`` / ``accelerate launch`` (DDP):
each rank reads its own shard of every batch, as `Trainer` arranges.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal

from arr_coc_cli import output_dir

logger = logging.getLogger(__name__)
TEST_KILL_ENV = "ARR_COC_TEST_KILL_AFTER_CHECKPOINT"  # test hook: SIGKILL this process right after checkpoint k


DEFAULTS = {
    "data": "synthetic", "train_samples": 512, "eval_samples": 32, "objectives": "answer=1,localise=1",
    "budget": "random", "compression_range": "2,16", "learning_rate": 1e-3,
    "max_steps": 200, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "save_steps": 50,
    "eval_steps": 100, "logging_steps": 10, "seed": 0, "report_to": "none",
}  # fmt: skip


def resolve_options(args: argparse.Namespace) -> dict:
    options = dict(DEFAULTS, output_dir=os.path.join(output_dir(), "train"))
    if args.config:
        import yaml

        with open(args.config) as f:
            loaded = yaml.safe_load(f) or {}
        unknown = {k.replace("-", "_") for k in loaded} - set(vars(args))
        if unknown:
            raise ValueError(f"{args.config}: unknown options {sorted(unknown)}")
        options.update({k.replace("-", "_"): v for k, v in loaded.items()})
    options.update({k: v for k, v in vars(args).items() if v is not None and k not in ("config", "func", "command")})
    if not options.get("model") and not options.get("backbone"):
        options["model"] = "arr-coc-tiny"
    return options


def _datasets(options: dict):
    from ..data import parse_data_spec, synthetic

    kind, source = parse_data_spec(options["data"])
    n_train, n_eval = int(options["train_samples"]), int(options["eval_samples"])
    if kind == "synthetic":
        tasks = source
        start = int(options["seed"]) * 1_000_000
        train = synthetic.dataset(tasks, range(start, start + n_train))
        valid = (
            synthetic.dataset(tasks, range(synthetic.EVAL_SEED_START - n_eval, synthetic.EVAL_SEED_START))
            if n_eval
            else None
        )
        return train, valid
    from ..data.vqa import load_vqa

    train = load_vqa(kind, source, split="train", limit=n_train)
    valid = load_vqa(kind, source, split="validation", limit=n_eval) if n_eval else None
    if valid is not None and source and os.path.isfile(source):  # one local file has no splits: both read it
        logger.warning(f"--data {options['data']} is one local file, so the evaluation's {n_eval} rows are its first "
                       "rows, the ones training reads too: its eval_loss is not held out (pass --eval-samples 0, or "
                       "a Hub dataset with a validation split)")  # fmt: skip
    return train, valid


def _kill_hook():
    from transformers import TrainerCallback

    target = int(os.environ[TEST_KILL_ENV])

    class KillAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == target and state.is_world_process_zero:
                os.kill(os.getpid(), signal.SIGKILL)

    return KillAfterCheckpoint()


def _heads_parts(model, options: dict) -> list[str]:
    """The parts to train (`surgery`): ``train_parts`` or, without it, the heads the run's encoding reads; adds the
    saccade's own heads first for ``saccade_heads``. Raises `ValueError` for ``saccade_heads`` outside a saccade run,
    and for heads the run's encoding never reads (they would get no gradient)."""
    encoding = model.config.encoding
    if options.get("saccade_heads"):
        if encoding != "saccade":
            raise ValueError("--saccade-heads trains the saccade's own heads: pass --encoding saccade too")
        if model.saccade_relevance is None:
            model.add_saccade_heads()
    reads = "saccade_relevance" if model.relevance_heads(encoding) is model.saccade_relevance else "relevance"
    if encoding == "saccade" and reads == "relevance":
        logger.warning("a saccade run trains the heads the single encoding reads too (this model has no saccade heads): "
                       "heads trained on gists cost the single encoding; pass --saccade-heads to train the saccade's "
                       "own and keep the single encoding's as they are")  # fmt: skip
    parts = [p.strip() for p in str(options.get("train_parts") or reads).split(",") if p.strip()]
    unread = [p for p in parts if p.split(".")[0] in ("relevance", "saccade_relevance") and p.split(".")[0] != reads]
    if unread:
        raise ValueError(f"--train-parts {','.join(unread)}: a run with --encoding {encoding} on this model reads the "
                         f"heads in {reads!r}, so these would get no gradient; train {reads!r} (or leave "
                         "--train-parts out)")  # fmt: skip
    return parts


def train(options: dict) -> dict:
    """Run one training job; returns a summary (paths, steps, final metrics)."""
    from transformers import TrainingArguments, set_seed

    from ..io import last_complete_checkpoint
    from ..modeling_arr_coc import ArrCocForConditionalGeneration
    from ..processing_arr_coc import ArrCocProcessor
    from ..scoped_lora import add_scoped_lora, parse_spec
    from . import surgery
    from .data import VQACollator
    from .objectives import ObjectiveWeights
    from .trainer import ArrCocTrainer

    set_seed(int(options["seed"]))  # fresh heads and LoRA matrices start the same in every run
    if options.get("backbone"):
        model = ArrCocForConditionalGeneration.from_backbone(options["backbone"], mode="trained")
        processor = ArrCocProcessor.from_pretrained(options["backbone"])
    else:
        model = ArrCocForConditionalGeneration.from_pretrained(options["model"])
        processor = ArrCocProcessor.from_pretrained(options["model"])
    model.config.mode = "trained"
    own_encoding = model.config.encoding
    for field in ("encoding", "relevance_spread", "relevance_floor"):  # config fields the run trains (and saves) with
        if options.get(field) is not None:
            setattr(model.config, field, options[field])
    model.config.check()
    surgery.freeze(model, "all")
    surgery.unfreeze(model, *_heads_parts(model, options))
    if options.get("lora_r"):
        surgery.add_lora(model, r=int(options["lora_r"]), alpha=2 * int(options["lora_r"]))
    consistency = ObjectiveWeights.parse(options["objectives"]).consistency
    if options.get("vision_lora") and model.config.encoding != "saccade" and not consistency:
        raise ValueError("--vision-lora is on only for saccade passes: train it with --encoding saccade or the "
                         "consistency objective")  # fmt: skip
    for part, option in (("language_model", "lm_lora"), ("vision", "vision_lora")):  # fresh scoped LoRA: trained
        if options.get(option):
            spec = options[option]
            add_scoped_lora(model, part, **(spec if isinstance(spec, dict) else parse_spec(spec)))
    if options.get("gradient_checkpointing"):
        surgery.set_gradient_checkpointing(model, True)
    summary = surgery.report(model)

    train_data, valid_data = _datasets(options)
    out = options["output_dir"]
    report_to = [] if options["report_to"] in (None, "none") else str(options["report_to"]).split(",")
    args = TrainingArguments(
        output_dir=out, max_steps=int(options["max_steps"]), learning_rate=float(options["learning_rate"]),
        per_device_train_batch_size=int(options["per_device_train_batch_size"]),
        per_device_eval_batch_size=int(options["per_device_train_batch_size"]),
        gradient_accumulation_steps=int(options["gradient_accumulation_steps"]), save_steps=int(options["save_steps"]),
        eval_strategy="steps" if valid_data is not None else "no", eval_steps=int(options["eval_steps"]),
        logging_steps=int(options["logging_steps"]), seed=int(options["seed"]), data_seed=int(options["seed"]),
        report_to=report_to, remove_unused_columns=False, dataloader_num_workers=0, save_only_model=False,
        push_to_hub=bool(options.get("push_to_hub")), hub_model_id=options.get("hub_model_id"),
        use_cpu=bool(options.get("use_cpu")), ddp_find_unused_parameters=True, disable_tqdm=False,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, dataloader_pin_memory=False,
    )  # fmt: skip
    collator = VQACollator(processor)
    if options.get("cache_encoder"):
        from .cache import cached_datasets, check_cached_training
        from .objectives import ObjectiveWeights

        check_cached_training(model, ObjectiveWeights.parse(options["objectives"]), model.config.encoding)
        pools = {"train": {k: options[k] for k in ("data", "train_samples", "seed")},
                 "eval": {k: options[k] for k in ("data", "eval_samples")}}  # fmt: skip
        train_data, valid_data, collator = cached_datasets(model, collator, train_data, valid_data,
                                                           options["cache_encoder"], pools, args)  # fmt: skip
    part_lr = None
    if options.get("part_lr"):
        part_lr = {k.strip(): float(v) for k, v in (kv.split("=") for kv in str(options["part_lr"]).split(","))}
    low, high = (float(v) for v in str(options["compression_range"]).split(","))
    trainer = ArrCocTrainer(
        model=model, args=args, train_dataset=train_data, eval_dataset=valid_data, data_collator=collator,
        objectives=options["objectives"], budget=options["budget"], compression_range=(low, high),
        part_learning_rates=part_lr, layer_decay=options.get("layer_decay"),
        callbacks=[_kill_hook()] if os.environ.get(TEST_KILL_ENV) else None,
    )  # fmt: skip
    resume = options.get("resume")
    if resume == "auto":
        resume = last_complete_checkpoint(out)
    if trainer.is_world_process_zero():
        print(surgery.format_report(summary))
    result = trainer.train(resume_from_checkpoint=resume)
    run_encoding = model.config.encoding
    if model.saccade_relevance is not None:  # either encoding reads its own heads: the model's default stays its own
        model.config.encoding = own_encoding
    trainer.save_model(out)
    if trainer.is_world_process_zero():
        processor.save_pretrained(out)
        if options.get("save_heads_only"):
            base = options.get("backbone") or options.get("model")
            from .trainer import save_heads

            save_heads(trainer.accelerator.unwrap_model(trainer.model), os.path.join(out, "heads"), base_model=base)
    model.config.encoding = run_encoding  # the final evaluation reads the run's encoding
    metrics = dict(result.metrics)
    if valid_data is not None:
        metrics.update(trainer.evaluate())
    summary = {"output_dir": out, "global_step": trainer.state.global_step, "metrics": metrics, "resumed_from": resume}
    if trainer.is_world_process_zero():
        with open(os.path.join(out, "train_summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
    return summary


def main_from_args(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    summary = train(resolve_options(args))
    print(json.dumps({k: summary[k] for k in ("output_dir", "global_step", "resumed_from")}))
    if dist.is_available() and dist.is_initialized():  # under torchrun: every rank done, then a clean teardown
        dist.barrier()
        dist.destroy_process_group()
    return 0
