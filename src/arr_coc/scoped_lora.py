"""Scoped LoRA: PEFT LoRA adapters on the backbone that are on only where arr-coc changes what the backbone sees.

Two parts may carry one (``ArrCocConfig.scoped_lora``; `add_scoped_lora` puts a fresh one on a model):

- ``"language_model"`` – on the language model's attention (and, when named, MLP) projections, **on only for the rows (samples) whose
  sequence holds a pooled visual token** (a region passing fewer tokens than it covers; `RelevanceRealization.
  pooled`): the language model learns to read compressed sequences while a sample at a budget >= native, and a
  text-only one, runs the stock backbone – alone, in a batch mixed with compressed samples, at the prefill and at
  every decoding step.
- ``"vision"`` – on the vision tower's attention (and, when named, MLP), **on only for the saccade's encodings**: its gist, and its crops of
  an image it compresses. The single encoding (and a saccade at a budget >= native, whose one crop is the whole
  image) runs the stock encoder.

One mechanism serves both. The adapters are injected with PEFT (`peft.inject_adapter_in_model`, never merged) and
left inactive, so PEFT's forward of every LoRA layer computes its base layer alone; a forward hook on each adds
the low-rank update where the adapter is in scope (`lora_scope`, a context variable: per thread, so concurrent calls
on one model do not see each other's scopes) – to the whole output, or to some batch rows, as PEFT's mixed-adapter
batches do (``adapter_names`` with ``"__base__"`` for the other rows): the base layer runs over the whole batch and
the other rows are never touched, so their numerics are the stock model's bit for bit. Which rows a prefill pooled
travels with its KV cache (`keep_pooled_rows` / `pooled_rows`), so decoding steps – `generate`'s and manual loops'
– keep each row's scope.

Gradient checkpointing recomputes a layer after its forward pass has left the scope: the model wraps its
checkpoint function with `checkpoint_in_scope`, so the recomputation runs in the scope of the original pass.

The adapters' weights are saved with the model (full checkpoints) and with the heads (heads-only folders); the
config names them, so loading injects them first (`inject_scoped_lora`). PEFT is imported only when a model has one.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import os
import re
from collections.abc import Sequence

import torch

# part -> (PEFT adapter name, where its target modules sit under the backbone, its default settings)
SCOPED_LORA_PARTS = {
    "language_model": ("arr_coc_lm", r"model\.language_model\.layers\.\d+\.(?:self_attn|mlp)\."),
    "vision": ("arr_coc_vision", r"model\.visual\.blocks\.\d+\.(?:attn|mlp)\."),
}
SCOPED_LORA_DEFAULTS = {
    "language_model": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    "vision": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["qkv", "proj"]},
}
SCOPED_LORA_SCOPES = {
    "language_model": "the rows (samples) whose sequence holds a pooled visual token: fewer visual tokens passed on "
    "than the image's native count",
    "vision": "the saccade's encodings: its gist, and its crops of an image passed on with fewer tokens than native",
}
POOLED_ROWS = "arr_coc_pooled"  # the attribute a call leaves on its cache: [B] bool, the rows it pooled

# the scopes entered in this context: (switch, rows) pairs – rows None for every input, else a bool per batch row
_ACTIVE: contextvars.ContextVar[tuple] = contextvars.ContextVar("arr_coc_scoped_lora", default=())


class _Switch:
    """One model's scoped LoRA on one part: what `lora_scope` turns on and its layers' hooks look up (by identity,
    so another model – or a copy of the vision tower, like the consistency objective's teacher – is not affected)."""

    def __init__(self, name: str):
        self.name = name  # the PEFT adapter name


def parse_spec(text: str) -> dict:
    """``"r=8,alpha=16,dropout=0.05,targets=q_proj+v_proj"`` (any subset; ``"r=8"`` alone is enough) -> settings.

    Raises `ValueError` naming the bad item and the expected form."""
    out = {}
    for item in str(text).split(","):
        if not item.strip():
            continue
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        try:
            if key in ("r", "alpha"):
                out[key] = int(value)
            elif key == "dropout":
                out[key] = float(value)
            elif key == "targets":
                out["target_modules"] = [t for t in value.split("+") if t]
            else:
                raise ValueError(key)
        except ValueError:
            raise ValueError(
                f"scoped LoRA setting {item.strip()!r} is invalid: expected r=INT, alpha=INT, dropout=FLOAT, "
                "targets=NAME+NAME (e.g. 'r=8,alpha=16')"
            ) from None
    return out


def with_lora_defaults(specs: dict | None) -> dict | None:
    """Every part's settings completed from `SCOPED_LORA_DEFAULTS` (None or {}: None)."""
    if not specs:
        return None
    return {part: {**SCOPED_LORA_DEFAULTS.get(part, {}), **dict(settings)} for part, settings in specs.items()}


def inject_scoped_lora(model, specs: dict) -> None:
    """Inject the scoped LoRA of every part in ``specs`` (``ArrCocConfig.scoped_lora``: part -> settings) into
    ``model.vlm``, inactive; parameters keep their ``requires_grad`` and the new ones train. Raises `ValueError`
    when a part's target modules match nothing in the backbone."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    switches = dict(getattr(model, "_scoped_lora", {}))
    for part, spec in specs.items():
        if part == "language_model":
            _check_rows_stay_apart(model)
        name, prefix = SCOPED_LORA_PARTS[part]
        pattern = _target_pattern(part, spec)
        names = [n for n, _ in model.vlm.named_modules()]
        unmatched = [
            t for t in spec["target_modules"] if not any(re.fullmatch(prefix + re.escape(t), n) for n in names)
        ]
        if unmatched:
            raise ValueError(f"scoped_lora.{part}: target_modules {unmatched} match no module of the backbone "
                             f"(searched {prefix}NAME); name its attention or MLP projections")  # fmt: skip
        config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"], target_modules=pattern)
        trainable = {id(p): p.requires_grad for p in model.vlm.parameters()}
        inject_adapter_in_model(config, model.vlm, adapter_name=name)
        del model.vlm.peft_config  # the settings live in ArrCocConfig.scoped_lora; the backbone stays a plain model
        switches[part] = _Switch(name)
        for layer in model.vlm.modules():
            if isinstance(layer, LoraLayer) and name in layer.lora_A:
                layer._active_adapter = []  # PEFT's forward: the base layer alone
                layer.register_forward_hook(functools.partial(_add_update, switches[part]))
        for p in model.vlm.parameters():  # PEFT freezes everything but the adapters: keep what was trainable
            p.requires_grad_(trainable.get(id(p), True))
    model._scoped_lora = switches


def _check_rows_stay_apart(model) -> None:
    """Raise `ValueError` for a backbone whose layers mix the rows of a batch: LLM.int8 (bitsandbytes 8-bit with an
    outlier threshold) picks its outlier columns from every row, so a full-budget sample beside a compressed one – whose
    activations the adapter changes – would not compute what the stock backbone computes."""
    for config in (model.config, model.vlm.config):
        quantization = getattr(config, "quantization_config", None)
        settings = quantization.to_dict() if hasattr(quantization, "to_dict") else dict(quantization or {})
        if settings.get("load_in_8bit") and settings.get("llm_int8_threshold", 6.0) > 0:
            raise ValueError(
                f"the language model's scoped LoRA needs the rows of a batch computed apart, but LLM.int8 (llm_int8_"
                f"threshold={settings.get('llm_int8_threshold', 6.0)}) picks its outlier columns across the batch: load "
                "the backbone with BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0), in 4 bit or with "
                "torchao, or without the adapter"
            )


def add_scoped_lora(model, part: str, **settings) -> dict:
    """Put a fresh (zero-effect) scoped LoRA on ``part`` (``"language_model"`` or ``"vision"``) of an arr-coc model
    and record its settings in ``model.config.scoped_lora``; returns them. ``settings``: r, alpha, dropout,
    target_modules (defaults: `SCOPED_LORA_DEFAULTS`). Raises `ValueError` for an unknown part, a part that has
    one already, or invalid settings."""
    if part not in SCOPED_LORA_PARTS:
        raise ValueError(f"scoped LoRA part {part!r} is unknown; expected one of {sorted(SCOPED_LORA_PARTS)}")
    specs = dict(model.config.scoped_lora or {})
    if part in specs:
        raise ValueError(f"the model has a {part} scoped LoRA already; train it (part '{part}.lora') or load another")
    previous = model.config.scoped_lora
    model.config.scoped_lora = with_lora_defaults({**specs, part: settings})
    try:
        model.config.check()
        inject_scoped_lora(model, {part: model.config.scoped_lora[part]})
    except ValueError:
        model.config.scoped_lora = previous
        raise
    return model.config.scoped_lora[part]


def _target_pattern(part: str, spec: dict) -> str:
    """The regex of ``part``'s target modules under the backbone (module names relative to it)."""
    return SCOPED_LORA_PARTS[part][1] + "(" + "|".join(re.escape(t) for t in spec["target_modules"]) + ")"


def save_peft_adapter(model, part: str, folder: str) -> str:
    """``part``'s scoped LoRA as a standard PEFT adapter folder for the stock backbone (``adapter_config.json``,
    ``adapter_model.safetensors``): ``PeftModel.from_pretrained(backbone, folder)`` puts it on every input, so whoever
    serves it applies it only within its scope (`SCOPED_LORA_SCOPES`), e.g. as a per-request LoRA. Returns the
    folder; raises `ValueError` when the model has no scoped LoRA on ``part``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    if not has_scoped_lora(model, part):
        raise ValueError(f"the model has no {part} scoped LoRA to save")
    spec, name = model.config.scoped_lora[part], SCOPED_LORA_PARTS[part][0]
    config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                        target_modules=_target_pattern(part, spec), base_model_name_or_path=model.vlm.name_or_path)  # fmt: skip
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    state = {"base_model.model." + k.removeprefix("vlm.").replace(f".{name}.", "."): v.detach().contiguous().cpu()
             for k, v in scoped_lora_parameters(model, part).items()}  # fmt: skip
    save_file(state, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def has_scoped_lora(model, part: str) -> bool:
    """Whether ``model`` carries a scoped LoRA on ``part``."""
    return part in getattr(model, "_scoped_lora", {})


def scoped_lora_parameters(model, part: str | None = None) -> dict[str, torch.nn.Parameter]:
    """The scoped LoRA weights of ``part`` (None: every part) by their names in ``model``."""
    names = [SCOPED_LORA_PARTS[p][0] for p in ([part] if part else SCOPED_LORA_PARTS)]
    pattern = re.compile(r"\.lora_(A|B)\.(" + "|".join(names) + r")\.")
    return {n: p for n, p in model.named_parameters() if pattern.search(n)}


def load_scoped_lora(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy the scoped LoRA weights in ``state`` (names as in the model) into ``model``. Raises `ValueError` when
    ``source`` holds scoped LoRA weights the model has no place for, or lacks some the model has."""
    own = scoped_lora_parameters(model)
    pattern = re.compile(r"\.lora_(A|B)\.(" + "|".join(n for n, _ in SCOPED_LORA_PARTS.values()) + r")\.")
    given = {k for k in state if pattern.search(k)}
    missing, unexpected = sorted(set(own) - given), sorted(given - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{source}: its scoped LoRA weights do not match the model's (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); load it with the settings it was saved with (its arr_coc_heads.json / config.json)"
        )
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(state[name].to(p.dtype))


@contextlib.contextmanager
def lora_scope(model, part: str, on: bool | Sequence[bool] | torch.Tensor | None = True):
    """Inside the block (in this thread), ``part``'s scoped LoRA – if the model has one – is on: ``on=True`` for
    every input, a [B] bool sequence for the batch rows marked True (dim 0 of each LoRA layer's input), False / None
    for none."""
    switch = getattr(model, "_scoped_lora", {}).get(part)
    rows = None if isinstance(on, bool) or on is None else tuple(bool(v) for v in on)
    if switch is None or on is None or on is False or (rows is not None and not any(rows)):
        yield
        return
    token = _ACTIVE.set((*_ACTIVE.get(), (switch, None if all(rows or ()) else rows)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _add_update(switch: _Switch, layer, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """A scoped LoRA layer's forward hook: its base layer's ``output`` as it is, plus the low-rank update
    B(A(dropout(x))) * scaling (PEFT's vanilla LoRA) where the adapter is in scope – every row, or only the rows in
    scope (the others left untouched)."""
    rows = next((rows for s, rows in reversed(_ACTIVE.get()) if s is switch), False)
    if rows is False:
        return output
    name, x = switch.name, args[0]
    if rows is not None and len(rows) != x.shape[0]:
        raise ValueError(f"the scoped LoRA is on for {len(rows)} rows, but its layer got a batch of {x.shape[0]}")
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    index = None if rows is None else torch.tensor([i for i, on in enumerate(rows) if on], device=x.device)
    if index is not None:
        x = x.index_select(0, index)
    update = (lora_b(lora_a(layer.lora_dropout[name](x.to(lora_a.weight.dtype)))) * layer.scaling[name]).to(
        output.dtype
    )
    return output + update if index is None else output.index_add(0, index, update)


def checkpoint_in_scope(checkpoint):
    """A gradient-checkpoint function (``checkpoint(function, *args, **kwargs)``) whose recomputation, run by the
    backward pass after the forward pass has left its scopes (maybe in another thread), runs in the scopes of that
    forward pass."""

    def run(function, *args, **kwargs):
        return checkpoint(functools.partial(_in_scopes, _ACTIVE.get(), function), *args, **kwargs)

    return run


def _in_scopes(entries: tuple, function, *args, **kwargs):
    token = _ACTIVE.set(entries)
    try:
        return function(*args, **kwargs)
    finally:
        _ACTIVE.reset(token)


# ----------------------------------------------------------------------------- the language model's rows


def keep_pooled_rows(cache, pooled: torch.Tensor | None) -> None:
    """Record on a call's ``cache`` which rows ([B] bool) its sequence pooled, for the decoding steps on it."""
    if cache is not None and pooled is not None:
        setattr(cache, POOLED_ROWS, pooled)


def pooled_rows(pooled: torch.Tensor | None, cache, batch: int) -> torch.Tensor | None:
    """The rows ([batch] bool) the language model's scoped LoRA is on for in a call without images: ``pooled`` as
    given, else what the cache's prefill recorded (repeated when ``generate`` repeats every row per beam or returned
    sequence), else None (no row). Raises `ValueError` when neither count fits ``batch``."""
    if pooled is None:
        pooled = getattr(cache, POOLED_ROWS, None)
        if pooled is None:
            return None
        if batch % pooled.shape[0]:
            raise ValueError(f"the cache holds a prefill of {pooled.shape[0]} rows, but this call has {batch}; "
                             "pass pooled= (the prefill output's pooled, one entry per row)")  # fmt: skip
        pooled = pooled.repeat_interleave(batch // pooled.shape[0])
    if pooled.shape != (batch,):
        raise ValueError(f"pooled must be [batch] = [{batch}] booleans (one per row), got shape {tuple(pooled.shape)}")
    return pooled


def backbone_state(model) -> dict[str, torch.Tensor]:
    """``model.vlm``'s weights as the stock backbone names them: a scoped LoRA's base layers under their plain names
    (``q_proj.base_layer.weight`` -> ``q_proj.weight``), its adapter weights left out."""
    return {k.replace(".base_layer.", "."): v for k, v in model.vlm.state_dict().items() if ".lora_" not in k}


def stock_backbone(model):
    """``model.vlm`` without its scoped LoRA adapters (itself when it has none): a fresh backbone of the same config
    with `backbone_state`'s weights."""
    if not getattr(model, "_scoped_lora", None):
        return model.vlm
    from transformers import AutoModelForImageTextToText

    vlm = AutoModelForImageTextToText.from_config(model.vlm.config)
    vlm.load_state_dict(backbone_state(model))
    vlm.generation_config = copy.deepcopy(model.vlm.generation_config)
    return vlm
