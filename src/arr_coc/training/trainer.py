"""ArrCocTrainer: `transformers.Trainer` with arr-coc's objectives, budget sampling and strict resume."""

from __future__ import annotations

import copy
import json
import os

import torch
from safetensors.torch import save_file
from transformers import Trainer
from transformers.utils import logging

from ..io import COMPLETE, HEADS_CONFIG, last_complete_checkpoint, mark_complete
from ..loading import HEADS_WEIGHTS
from ..relevance import ALL_TOKENS, RealizationRequest, budget_options
from ..scoped_lora import scoped_lora_parameters
from .cache import CachedPool, check_cached_training
from .objectives import (
    ObjectiveWeights,
    answer_survived,
    attribution_targets,
    budget_loss,
    consistency_loss,
    cover_loss,
    distillation_loss,
    expected_budget_share,
    localisation_loss,
    zero_loss,
)

logger = logging.get_logger(__name__)


class ArrCocTrainer(Trainer):
    """Trains an `ArrCocForConditionalGeneration` with `ObjectiveWeights`.

    ``budget``: how each training sample's budget is chosen – ``"auto"`` (the budget head's own
    choice), ``"random"`` (a compression ratio drawn per sample from ``compression_range``, log-uniform
    and seeded by the step; what the ``budget`` objective's survival model needs to see both sides of
    each answer's threshold), or a fixed int / ratio string like ``"1/8"``. Batches may carry ``answer_box`` [B, 4] and ``image_size`` [B, 2] for the
    localisation term; they never reach the model. A ``train_dataset`` of cached encoder outputs
    (`training.cache.CachedPool`, batches with ``image_features``) is checked first: nothing trained may need the
    vision encoder to run (`check_cached_training` raises `ValueError`).

    Resuming is strict: a checkpoint whose weights do not all match the model's names raises instead
    of loading silently with some weights left at their initial values.
    """

    def __init__(self, *args, objectives: ObjectiveWeights | str | dict | None = None, budget="random",
                 compression_range: tuple[float, float] = (2.0, 16.0), part_learning_rates: dict | None = None,
                 layer_decay: float | None = None, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.part_learning_rates, self.layer_decay = part_learning_rates, layer_decay
        # the loss is a mean per batch; DDP averages it over processes (no token-count rescaling)
        self.model_accepts_loss_kwargs = False
        self.objectives = objectives if isinstance(objectives, ObjectiveWeights) else ObjectiveWeights.parse(objectives)
        self.budget = budget
        self.compression_range = compression_range
        self._terms: dict[str, list[float]] = {}
        self._readable_sum, self._readable_steps = 0.0, 0  # the budget objective's readable shares over the run
        self._warned_unreadable = False
        # (e)'s teacher: the vision tower as given (a resumed run loads its trained weights only later), frozen
        self._teacher = None
        if isinstance(self.train_dataset, CachedPool):  # the vision encoder never runs in a step
            check_cached_training(self.model, self.objectives, self.model.config.encoding)
        if self.objectives.consistency:
            if self.args.world_size > 1:  # (e) runs the encoder outside the DDP wrapper's forward
                raise ValueError("the consistency objective trains in one process: run it without torchrun/accelerate")
            if not any(p.requires_grad for p in self.model.vlm.model.visual.parameters()):
                raise ValueError("the consistency objective trains the vision encoder, and every one of its parameters "
                                 "is frozen: unfreeze it (--train-parts vision_encoder,merger) or give it a scoped LoRA "
                                 "(--vision-lora r=8), or drop consistency= from --objectives")  # fmt: skip
            self._teacher = copy.deepcopy(self.model.vlm.model.visual).requires_grad_(False).eval()

    def create_optimizer(self, model=None):
        """Per-part learning rates and layer-wise decay (`surgery.parameter_groups`) when asked for."""
        if self.optimizer is None and self.part_learning_rates:
            from .surgery import parameter_groups

            opt_model = self.model if model is None else model
            groups = parameter_groups(opt_model, self.part_learning_rates, self.layer_decay, self.args.weight_decay)
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            return self.optimizer
        return super().create_optimizer(model)

    def _step_generator(self) -> torch.Generator:
        """Seeded by the run's seed and the step, so every DDP process and a resumed run draw the same."""
        return torch.Generator().manual_seed(int(self.args.seed) * 1_000_003 + int(self.state.global_step))

    def _budget_kwargs(self, batch_size: int) -> dict:
        if self.budget == "auto":
            return {}
        if self.budget == "random":
            # one ratio per sample of the global batch, so every process of a DDP run draws the same ones
            g = self._step_generator()
            lo, hi = (torch.log(torch.tensor(float(v))) for v in self.compression_range)
            offset = self.args.process_index * batch_size
            ratios = torch.exp(lo + (hi - lo) * torch.rand(offset + batch_size, generator=g))[offset:]
            return {"compression": [float(r) for r in ratios]}
        return budget_options(self.budget)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        boxes, sizes = inputs.pop("answer_box", None), inputs.pop("image_size", None)
        if "image_features" in inputs:  # cached encoder outputs (`training.cache`): on the batch's device
            inputs["image_features"] = [f.to(inputs["input_ids"].device) for f in inputs["image_features"]]
        w = self.objectives
        core = self.accelerator.unwrap_model(model) if hasattr(self, "accelerator") else model
        loss, terms, outputs = torch.zeros((), device=inputs["input_ids"].device), {}, None
        if return_outputs or w.answer or w.localise or w.cover or w.distill or w.budget:  # (e) alone needs no LM
            loss, terms, outputs = self._compressed_terms(model, core, inputs, boxes, sizes, return_outputs)
        if w.consistency:
            term = consistency_loss(
                core, inputs["pixel_values"], inputs["image_grid_thw"], self._teacher, self._step_generator()
            )
            loss, terms["consistency"] = loss + w.consistency * term, term.detach()
        if model.training and not loss.requires_grad:
            raise ValueError(
                f"no objective in {w} reaches a trainable parameter: unfreeze a part the loss reaches, add "
                "localise=, cover=, distill= or budget= for the relevance heads, or consistency= for the vision encoder"
            )
        if outputs is not None and not w.budget:  # DDP expects every tensor the model returned to reach the loss
            loss = loss + 0.0 * sum(r.expected_tokens for r in outputs.realizations)
        if model.training:  # evaluation reports its own loss; these are the training terms
            for k, v in terms.items():
                self._terms.setdefault(k, []).append(float(v))
        return (loss, outputs) if return_outputs else loss

    def _compressed_terms(self, model, core, inputs: dict, boxes, sizes, return_outputs: bool):
        """Objectives (a)-(d) and (f) on one forward pass with the compressed tokens -> (loss, logged terms, outputs).

        When only ``localise`` / ``cover`` are on they read nothing but the realizations, so the language model is
        skipped (outputs None) – in one process; under DDP the wrapped model's forward runs, as gradient
        synchronisation needs."""
        w = self.objectives
        targets = attribution_targets(core, inputs) if w.distill else None
        budget = self._budget_kwargs(inputs["input_ids"].shape[0])
        outputs = None
        if return_outputs or w.answer or w.distill or w.budget or self.args.world_size > 1:
            outputs = model(**inputs, **budget)
            realizations = outputs.realizations
            loss = outputs.loss * w.answer if w.answer else outputs.logits.sum() * 0.0
            terms = {"answer": outputs.loss.detach()}
        else:
            images = core.image_inputs(
                inputs.get("pixel_values"), inputs["image_grid_thw"], inputs.get("image_features")
            )
            realizations = core.compress_inputs(inputs["input_ids"], inputs.get("attention_mask"), images,
                                                inputs.get("question_mask"), request=RealizationRequest(**budget)
                                                ).realizations  # fmt: skip
            loss, terms = zero_loss(realizations), {}
        if w.localise and boxes is not None:
            term = localisation_loss(realizations, boxes, sizes)
            loss, terms["localise"] = loss + w.localise * term, term.detach()
        if w.cover and boxes is not None:
            term = cover_loss(realizations, boxes, sizes, core.allocator)
            loss, terms["cover"] = loss + w.cover * term, term.detach()
        if w.distill:
            term = distillation_loss(realizations, targets)
            loss, terms["distill"] = loss + w.distill * term, term.detach()
        if w.budget:
            survived = answer_survived(outputs.logits.detach(), outputs.labels)
            with torch.no_grad():  # which answers the backbone reads with every visual token
                full = core(**inputs, budget=ALL_TOKENS)
            readable = answer_survived(full.logits, full.labels)
            head = core.relevance_heads(core.config.encoding).budget
            term = budget_loss(realizations, survived, head.slope, core.config.budget_confidence, readable)
            loss, terms["budget"] = loss + w.budget * term, term.detach()
            terms["survived"], terms["slope"] = survived.float().mean(), head.slope.detach()
            terms["readable"] = readable.float().mean()
        used, native = sum(r.tokens_used for r in realizations), sum(r.native_count for r in realizations)
        terms["tokens_share"] = torch.tensor(used / native)
        terms["expected_share"] = torch.tensor(expected_budget_share(realizations))
        return loss, terms, outputs

    def log(self, logs: dict, *args, **kwargs) -> None:
        for k, values in self._terms.items():
            if values:
                logs[f"{k}"] = round(sum(values) / len(values), 4)
        readable = self._terms.get("readable")
        if readable:  # whether any answer was readable so far: one unlucky logging window is not a warning
            self._readable_sum += sum(readable)
            self._readable_steps += len(readable)
            steps_left = self.state.max_steps - self.state.global_step
            enough = self._readable_steps >= 16 or steps_left <= 0
            if self._readable_sum == 0 and enough and not self._warned_unreadable:
                self._warned_unreadable = True
                logger.warning(
                    f"the backbone answered none of the {self._readable_steps} steps' samples right with every visual "
                    "token (readable 0), so the budget objective had nothing to learn from them: the budget head "
                    "learns only from answers the backbone can read – check the data's answers and prompt format, or "
                    "train the budget on data the backbone reads"
                )
        self._terms = {}
        super().log(logs, *args, **kwargs)

    def _issue_warnings_after_load(self, load_result) -> None:
        tied = set(getattr(self.model, "all_tied_weights_keys", {}) or {})
        missing = [k for k in load_result.missing_keys if k not in tied]
        if missing or load_result.unexpected_keys:
            raise RuntimeError(
                f"the checkpoint does not match the model: missing {missing[:8]}, unexpected "
                f"{list(load_result.unexpected_keys)[:8]} – it was written under other parameter names (e.g. by "
                "save_pretrained(save_original_format=True)); load it with from_pretrained instead"
            )
        if load_result.missing_keys:
            self.model.tie_weights()

    def _save_checkpoint(self, model, trial) -> None:
        """The stock checkpoint, then a completion marker; old checkpoints are rotated only after it."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            run_dir = self._get_output_dir(trial=trial)
            mark_complete(os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"))
            if limit is not None:
                rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)  # fmt: skip

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not os.path.isfile(os.path.join(resume_from_checkpoint, COMPLETE)):
            raise ValueError(
                f"{resume_from_checkpoint} was not completed (its save was cut short); resume from the last complete "
                f"checkpoint: {last_complete_checkpoint(os.path.dirname(os.path.abspath(resume_from_checkpoint)))}"
            )
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def save_heads(self, output_dir: str | None = None) -> str:
        """Write only the relevance heads (PEFT-style, small), naming the backbone they belong to."""
        return save_heads(
            self.accelerator.unwrap_model(self.model), output_dir or os.path.join(self.args.output_dir, "heads")
        )


def save_heads(model, output_dir: str, base_model: str | None = None) -> str:
    """``arr_coc_heads.safetensors`` (the relevance heads – the saccade's own too, where the model has them – and any
    scoped LoRA's weights) + ``arr_coc_heads.json``
    (the arr-coc config, scoped LoRA settings included, and the backbone's name – ``base_model`` or where the model's
    backbone came from, a local folder as an absolute path; pass the Hub id to share the folder) + ``config.json``, so
    `ArrCocForConditionalGeneration.from_pretrained(output_dir)` and the Auto classes load the backbone by name and
    put these heads (and adapters) on it."""
    os.makedirs(output_dir, exist_ok=True)
    state = {
        f"{name}.{k}": v.detach().contiguous().cpu()
        for name, heads in model.relevance_modules.items()
        for k, v in heads.state_dict().items()
    }
    state.update({k: v.detach().contiguous().cpu() for k, v in scoped_lora_parameters(model).items()})
    save_file(state, os.path.join(output_dir, HEADS_WEIGHTS), metadata={"format": "pt"})
    base = base_model or model.config.vlm_config.name_or_path or model.vlm.name_or_path
    if not base:
        raise ValueError("the backbone has no name or path to refer to; pass base_model=")
    if os.path.isdir(base):  # a local folder: absolute, so the heads load from any working directory
        base = os.path.abspath(base)
    config = model.config.to_dict()
    with open(os.path.join(output_dir, HEADS_CONFIG), "w") as f:
        json.dump(
            {"base_model_name_or_path": str(base), "arr_coc": {k: v for k, v in config.items() if k != "vlm_config"}},
            f,
            indent=2,
        )
    model.config.save_pretrained(output_dir)
    return output_dir
