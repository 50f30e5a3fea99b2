"""Training arr-coc-tiny's backbone, one curriculum stage per call: dense reading loss on the vision encoder plus
the answer's language-model loss, resumable at any instant (atomic checkpoints with the optimizer and the data
position), on CPU or ``--device cuda``."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..io import atomic_directory, recover
from .cached import CachedBatches, cache_dir, vision_fingerprint
from .data import STAGES, StepBatches
from .evaluate import evaluate_model
from .model import GLYPH_CHARS, IGNORE, DenseGlyphHead, grow_vision_tower, tiny_image_processor, tiny_vlm_config
from .tokenizer import train_tokenizer


@dataclass
class Schedule:
    """A stage's learning-rate plan, fixed when it starts and kept by every resumed call.

    Linear warmup over ``warmup`` steps to ``lr`` (the backbone's after ``head_warmup``); with ``decay`` a linear decay to 0 by whichever ends first,
    ``steps`` optimizer steps or ``time_limit`` seconds of training (both counted from the schedule's start, over
    all calls). ``head_warmup``: the first steps train only the dense head (a new head on a trained backbone);
    ``head_lr``: the dense head's peak learning rate (default: ``lr``)."""

    lr: float
    steps: int
    warmup: int = 300
    decay: bool = False
    time_limit: float | None = None
    batch_size: int = 8
    head_warmup: int = 0
    head_lr: float | None = None
    start_step: int = 0  # the stage's step at the schedule's start
    start_wall_s: float = 0.0  # the stage's training seconds at the schedule's start

    def progress(self, step: int, stage_wall_s: float) -> float:
        """Share of the schedule done, in [0, 1]: steps or time, whichever is further."""
        done = (step - self.start_step) / self.steps
        if self.time_limit:
            done = max(done, (stage_wall_s - self.start_wall_s) / self.time_limit)
        return min(1.0, done)

    def ended(self, state: RunState) -> bool:
        """Whether the schedule is done at ``state``'s step and training time."""
        return self.progress(state.step, state.stage_wall_s) >= 1.0

    def factor(self, step: int, stage_wall_s: float, head: bool = False) -> float:
        """The peak learning rate's multiplier at ``step``: warmup (the backbone's starts after the head warmup),
        then the decay."""
        start = self.start_step + (0 if head else self.head_warmup)
        warm = min(1.0, max(0, step - start + 1) / max(1, self.warmup))
        return warm * ((1.0 - self.progress(step, stage_wall_s)) if self.decay else 1.0)


@dataclass
class RunState:
    stage: str = ""
    step: int = 0  # optimizer steps of the current stage (the data position: samples are seeded by it)
    seen: int = 0
    wall_s: float = 0.0  # training seconds over all stages
    total_steps: int = 0  # over all stages
    stage_wall_s: float = 0.0  # training seconds of the current stage
    schedule: dict | None = None  # the current stage's `Schedule`


def run_paths(run: str) -> dict:
    return {k: os.path.join(run, k) for k in ("base", "checkpoint", "log.jsonl", "eval.jsonl")}


def init_run(run: str, seed: int = 0) -> None:
    """Train the tokenizer and write the untrained model, processor and dense head."""
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = train_tokenizer()
    config = tiny_vlm_config(tokenizer)
    model = Qwen2VLForConditionalGeneration(config)
    head = DenseGlyphHead(config.text_config.hidden_size, config.vision_config.embed_dim)
    base = run_paths(run)["base"]
    os.makedirs(base, exist_ok=True)
    tokenizer.save_pretrained(base)
    tiny_image_processor().save_pretrained(base)
    save_checkpoint(run, model, head, None, RunState())
    print(
        f"initialised {run}: vocab {len(tokenizer)}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters"
    )


def init_from_model(run: str, model_dir: str, seed: int = 0) -> None:
    """Start a run from an exported arr-coc model folder (e.g. the shipped arr-coc-tiny): its backbone, tokenizer
    and image processor, with a new dense head."""
    from transformers import AutoTokenizer

    from ..assets import resolve_model_path
    from ..modeling_arr_coc import ArrCocForConditionalGeneration
    from ..scoped_lora import stock_backbone

    torch.manual_seed(seed)
    path = resolve_model_path(model_dir)
    model = stock_backbone(ArrCocForConditionalGeneration.from_pretrained(path)).float()  # its scoped LoRA left out
    tokenizer = AutoTokenizer.from_pretrained(path)
    head = DenseGlyphHead(model.config.text_config.hidden_size, model.config.vision_config.embed_dim)
    base = run_paths(run)["base"]
    os.makedirs(base, exist_ok=True)
    tokenizer.save_pretrained(base)
    tiny_image_processor().save_pretrained(base)
    save_checkpoint(run, model, head, None, RunState())
    print(f"initialised {run} from {path}")


def grow_run(run: str, depth: int, mlp_ratio: int, seed: int = 0) -> str:
    """Grow the run's vision tower in place (`model.grow_vision_tower`: the same function, more capacity), keeping its
    dense head and data position. The optimizer's moments and the stage's schedule are dropped (the parameters
    changed shape), so the next ``train`` call starts a new schedule (it needs ``--steps``). Stop any ``train`` call on
    the run first: its next checkpoint would overwrite the grown one."""
    model, head, _, _, state, _ = load_run(run)
    before = sum(p.numel() for p in model.parameters())
    grown = grow_vision_tower(model, depth, mlp_ratio, seed)
    state.schedule = None
    save_checkpoint(run, grown, head, None, state)
    after = sum(p.numel() for p in grown.parameters())
    return (
        f"grew {run}'s vision tower to {depth} blocks with MLPs of {mlp_ratio} x embed_dim: "
        f"{before / 1e6:.2f} M -> {after / 1e6:.2f} M parameters; continue with a new schedule (--steps ...)"
    )


def save_checkpoint(run: str, model, head, optimizer, state: RunState) -> None:
    """Write the run's checkpoint (backbone, dense head, optimizer, run state) atomically (`io.atomic_directory`):
    a loadable checkpoint exists at every instant, so the run can be stopped at any time."""
    with atomic_directory(run_paths(run)["checkpoint"], owned=("*",)) as staging:
        model.save_pretrained(staging)
        save_file(head.state_dict(), os.path.join(staging, "dense_head.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), os.path.join(staging, "optimizer.pt"))
        with open(os.path.join(staging, "state.json"), "w") as f:
            json.dump(asdict(state), f)


def load_run(run: str, device: str = "cpu"):
    """(model, head, tokenizer, image_processor, state, optimizer_state or None)."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    paths = run_paths(run)
    ckpt = paths["checkpoint"]
    recover(ckpt)  # a swap cut short by a kill
    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).to(device)
    head = DenseGlyphHead(model.config.text_config.hidden_size, model.config.vision_config.embed_dim).to(device)
    missing, unexpected = head.load_state_dict(load_file(os.path.join(ckpt, "dense_head.safetensors")), strict=False)
    if unexpected or set(missing) - set(DenseGlyphHead.OUTLINE_PARAMETERS):
        raise ValueError(f"{ckpt}/dense_head.safetensors does not match the dense head (missing {missing}, unexpected "
                         f"{unexpected}): it was not written by arr_coc.tiny train")  # fmt: skip
    if missing:  # a head saved before the outline target: its layer starts at zero, so a resumed run is reproducible
        torch.nn.init.zeros_(head.outline.weight)
        torch.nn.init.zeros_(head.outline.bias)
    with open(os.path.join(ckpt, "state.json")) as f:
        state = RunState(**json.load(f))
    opt_path = os.path.join(ckpt, "optimizer.pt")
    opt_state = torch.load(opt_path, weights_only=True, map_location=device) if os.path.exists(opt_path) else None
    tokenizer = AutoTokenizer.from_pretrained(paths["base"])
    image_processor = type(tiny_image_processor()).from_pretrained(paths["base"])
    return model, head, tokenizer, image_processor, state, opt_state


DENSE_ACCURACIES = ("patch_acc", "slot_acc", "outline_acc")


def dense_loss(head: DenseGlyphHead, vision, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """CE on the patch characters, on the token slots and on the tokens' outline colours (empty ones count 0.2).

    Returns (loss, accuracies): ``patch_acc`` and ``slot_acc`` on cells holding a glyph, ``outline_acc`` on tokens
    an outline crosses (NaN where there are none)."""
    none = len(GLYPH_CHARS)
    patch_logits = head.patch(vision.last_hidden_state)
    pt = batch["patch_targets"]
    w = torch.where(pt == none, 0.2, 1.0) * (pt != IGNORE)
    total = (F.cross_entropy(patch_logits, pt.clamp_min(0), reduction="none") * w).sum() / w.sum().clamp_min(1.0)
    tokens = torch.cat(vision.pooler_output)
    logits = head(tokens)
    targets = batch["dense_targets"]
    outline_logits = head.outline(tokens)
    for lg, t in [*((lg, targets[..., k]) for k, lg in enumerate(logits)), (outline_logits, batch["outline_targets"])]:
        w = torch.where(t == (lg.shape[-1] - 1), 0.2, 1.0) * (t != IGNORE)
        ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), t.reshape(-1).clamp_min(0), reduction="none")
        total = total + (ce * w.reshape(-1)).sum() / w.sum().clamp_min(1.0)

    def accuracy(pred, target, none):
        held = (target >= 0) & (target < none)
        return (pred == target)[held].float().mean().item() if held.any() else float("nan")

    return total, {
        "patch_acc": accuracy(patch_logits.argmax(-1), pt, none),
        "slot_acc": accuracy(logits[0].argmax(-1), targets[..., 0], none),
        "outline_acc": accuracy(outline_logits.argmax(-1), batch["outline_targets"], outline_logits.shape[-1] - 1),
    }


def with_new_head_parameters(opt_state: dict, head_count: int) -> dict:
    """The optimizer state of a checkpoint whose dense head predates its outline layer
    (`DenseGlyphHead.OUTLINE_PARAMETERS`, last in the head's parameter order): `torch.optim.Optimizer.state_dict`
    numbers parameters across groups in order (backbone 0..B-1, head B..B+H-1), so the new ones join the head's group
    as B+H, B+H+1 with no moments (AdamW starts them as new). Any other mismatch is left for
    `torch.optim.Optimizer.load_state_dict` to refuse."""
    if len(opt_state["param_groups"]) != 2:
        return opt_state
    backbone, head = opt_state["param_groups"]
    missing = head_count - len(head["params"])
    if missing != len(DenseGlyphHead.OUTLINE_PARAMETERS):
        return opt_state
    first = len(backbone["params"]) + len(head["params"])
    head = dict(head, params=[*head["params"], *range(first, first + missing)])
    return dict(opt_state, param_groups=[backbone, head])


def resolve_schedule(state: RunState, stage: str, options: dict, new_schedule: bool = False) -> Schedule:
    """The schedule a call trains with: the stage's stored one when resuming, else a new one from ``options``
    (`Schedule` fields; None = default). Resuming with options that contradict the stored schedule raises
    ValueError (nothing given is silently ignored)."""
    given = {k: v for k, v in options.items() if v is not None}
    if state.stage == stage and state.schedule and not new_schedule:
        stored = Schedule(**state.schedule)
        clash = {k: (getattr(stored, k), v) for k, v in given.items() if getattr(stored, k) != v}
        if clash:
            described = ", ".join(f"--{k.replace('_', '-')} {v!r} (stored: {old!r})" for k, (old, v) in clash.items())
            raise ValueError(
                f"stage {stage!r} of this run was started with another schedule: {described}. Leave these options "
                "out to continue it, or pass --new-schedule to start a new schedule from the current weights"
            )
        return stored
    if "steps" not in given:
        raise ValueError(f"a new schedule for stage {stage!r} needs --steps (optimizer steps of the schedule)")
    if state.stage != stage:
        state.stage, state.step, state.stage_wall_s = stage, 0, 0.0
    given.setdefault("lr", 5e-4)
    given.setdefault("batch_size", STAGES[stage].batch_size)
    schedule = Schedule(**given, start_step=state.step, start_wall_s=state.stage_wall_s)
    state.schedule = asdict(schedule)
    return schedule


def train(run: str, stage: str, options: dict, new_schedule: bool = False, seed: int = 0, device: str = "cpu",
          save_every: int = 200, save_minutes: float = 8.0, eval_every: int = 1000, threads: int | None = None,
          workers: int = 1) -> RunState:  # fmt: skip
    """Train ``stage`` from the run's checkpoint until its schedule (`resolve_schedule`) ends, or stop at any time.

    A checkpoint is written every ``save_every`` steps, whenever ``save_minutes`` have passed since the last one,
    and at the end; every checkpoint carries the weights, the optimizer, the data position and the schedule, so
    the same command continues the same curve after a kill (the next step's loss equals an uninterrupted run's).
    ``eval_every``: validation exact match (40 per task; also at 0.7 scale for a rescaling stage) to eval.jsonl."""
    from tqdm.auto import tqdm

    if threads:
        torch.set_num_threads(threads)
    model, head, tokenizer, image_processor, state, opt_state = load_run(run, device)
    spec = STAGES[stage]
    stored = (state.stage, state.schedule)
    schedule = resolve_schedule(state, stage, options, new_schedule)
    started = (state.stage, state.schedule) != stored  # a new schedule: not in the checkpoint until its first save
    params = list(model.parameters()) + list(head.parameters())
    peaks = (schedule.lr, schedule.head_lr or schedule.lr)
    groups = [{"params": list(model.parameters()), "lr": peaks[0]}, {"params": list(head.parameters()), "lr": peaks[1]}]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01, betas=(0.9, 0.98))
    if opt_state is not None:
        optimizer.load_state_dict(with_new_head_parameters(opt_state, len(groups[1]["params"])))
    model.train()
    hardware = f"CPU, {torch.get_num_threads()} threads"
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        hardware = torch.cuda.get_device_name(torch.device(device))
    stop = schedule.start_step + schedule.steps
    if spec.cached:
        source = CachedBatches(cache_dir(run, stage), state.step, stop, schedule.batch_size, seed,
                               tokenizer.pad_token_id, model.config.image_token_id, vision_fingerprint(model))  # fmt: skip
        model.model.visual.requires_grad_(False)
        workers = 0  # the pool is in memory
    else:
        source = StepBatches(stage, state.step, stop, schedule.batch_size, seed, tokenizer, image_processor)
    batches = torch.utils.data.DataLoader(
        source, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
        pin_memory=device.startswith("cuda"),
    )  # fmt: skip
    log = open(run_paths(run)["log.jsonl"], "a")
    bar = tqdm(initial=state.step - schedule.start_step, total=schedule.steps, desc=stage)
    t_last = t_saved = time.time()
    saved = None if started else state.step  # the step of this schedule's last checkpoint
    try:
        for step, batch in zip(range(state.step, stop), batches):
            if schedule.ended(state):  # resumed after its end
                break
            head_only = step - schedule.start_step < schedule.head_warmup
            for g, peak, is_head in zip(optimizer.param_groups, peaks, (False, True)):
                g["lr"] = peak * schedule.factor(step, state.stage_wall_s, head=is_head)
            batch = {k: v.to(device) for k, v in batch.items()}
            if spec.cached:
                split = (batch["image_grid_thw"].prod(-1) // 4).tolist()
                vision = BaseModelOutputWithPooling(pooler_output=batch.pop("features").split(split))
                d_loss, accuracies = torch.zeros((), device=device), dict.fromkeys(DENSE_ACCURACIES, float("nan"))
            else:
                with torch.set_grad_enabled(not head_only):
                    vision = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
                d_loss, accuracies = dense_loss(head, vision, batch)
            loss, lm_loss, tok_acc = d_loss, float("nan"), float("nan")
            if spec.lm_weight and not head_only:
                out = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
                    mm_encoder_outputs={"image": vision}, labels=batch["labels"],
                )  # fmt: skip
                loss = loss + spec.lm_weight * out.loss
                lm_loss = out.loss.item()
                with torch.no_grad():
                    mask = batch["labels"][:, 1:] != IGNORE
                    tok_acc = (out.logits[:, :-1].argmax(-1) == batch["labels"][:, 1:])[mask].float().mean().item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            now = time.time()
            state.wall_s += now - t_last
            state.stage_wall_s += now - t_last
            t_last = now
            state.step, state.total_steps = step + 1, state.total_steps + 1
            state.seen += batch["image_grid_thw"].shape[0]
            rec = {"stage": stage, "step": state.step, "total_steps": state.total_steps, "seen": state.seen,
                   "wall_s": round(state.wall_s, 1), "loss": round(loss.item(), 6), "lm_loss": round(lm_loss, 4),
                   "dense_loss": round(d_loss.item(), 4), **{k: round(v, 4) for k, v in accuracies.items()},
                   "answer_tok_acc": round(tok_acc, 4), "lr": optimizer.param_groups[0]["lr"],
                   "head_lr": optimizer.param_groups[1]["lr"], "device": hardware}  # fmt: skip
            log.write(json.dumps(rec) + "\n")
            bar.set_postfix(lm=f"{lm_loss:.3f}", dense=f"{d_loss.item():.3f}", patch=f"{accuracies['patch_acc']:.2f}",
                            outline=f"{accuracies['outline_acc']:.2f}", ans=f"{tok_acc:.2f}", refresh=False)  # fmt: skip
            bar.update(1)
            finished = schedule.ended(state)
            if state.step % save_every == 0 or finished or time.time() - t_saved >= save_minutes * 60:
                log.flush()
                save_checkpoint(run, model, head, optimizer, state)
                t_saved, saved = time.time(), state.step
            if eval_every and spec.lm_weight and state.step % eval_every == 0:
                result = evaluate_model(model, tokenizer, image_processor, n=40, device=device)
                if spec.min_scale < 1.0:
                    at_07 = evaluate_model(model, tokenizer, image_processor, n=40, device=device, scale=0.7)
                    result.update({f"{task}@0.7": v for task, v in at_07.items()})
                result.update(
                    stage=stage, step=state.step, total_steps=state.total_steps, wall_s=round(state.wall_s, 1)
                )
                with open(run_paths(run)["eval.jsonl"], "a") as f:
                    f.write(json.dumps(result) + "\n")
                bar.write(json.dumps(result))
                model.train()
            t_last = time.time()  # checkpoints and evaluations are not training time
            if finished:
                break
    finally:  # also when stopped (Ctrl-C, a kill's KeyboardInterrupt, an error): where the run stands
        bar.close()
        log.close()
        print(where_it_stands(run, stage, state, schedule, saved, dict(
            seed=seed, device=device, threads=threads, workers=workers, save_every=save_every,
            save_minutes=save_minutes, eval_every=eval_every)))  # fmt: skip
    return state


def where_it_stands(run: str, stage: str, state: RunState, schedule: Schedule, saved: int | None, call: dict) -> str:
    """The closing line of a `train` call: the step reached, the checkpoint kept and what to run next (``saved``:
    the step of this schedule's last checkpoint, None when a new schedule was never saved; ``call``: the call's
    options, repeated in the command to continue where they differ from `train`'s defaults)."""
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(train).parameters.items()}
    done = f"{stage}: step {state.step} ({state.step - schedule.start_step} of this schedule's {schedule.steps}; "
    done += f"{state.seen} images seen in all)"
    if saved is None:
        return (f"{done}; no checkpoint of this new schedule was written ({run_paths(run)['checkpoint']} keeps the "
                "run as it was before this call): run the same command again to start it")  # fmt: skip
    if schedule.ended(state):
        return f"{done}, checkpoint at step {saved}; its schedule has ended (more of this stage needs --new-schedule)"
    options = "".join(f" --{k.replace('_', '-')} {v}" for k, v in call.items() if v != defaults[k])
    return (f"{done}, checkpoint at step {saved} in {run_paths(run)['checkpoint']}; continue with: python -m "
            f"arr_coc.tiny train --run {run} --stage {stage}{options}")  # fmt: skip
