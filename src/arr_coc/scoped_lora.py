"""Scoped LoRA: PEFT LoRA adapters on the backbone that are on only where arr-coc changes what the backbone sees.

Two parts may carry one (``ArrCocConfig.scoped_lora``; `add_scoped_lora` puts a fresh one on a model):

- ``"language_model"`` – on the language model's attention projections, **on only for the rows (samples) whose
  sequence holds a pooled visual token** (a region passing fewer tokens than it covers; `RelevanceRealization.
  pooled`): the language model learns to read compressed sequences while a sample at a budget >= native, and a
  text-only one, runs the stock backbone – alone, in a batch mixed with compressed samples, at the prefill and at
  every decoding step.
- ``"vision"`` – on the vision tower's attention, **on only for the saccade's encodings**: its gist, and its crops of
  an image it compresses. The single encoding (and a saccade at a budget >= native, whose one crop is the whole
  image) runs the stock encoder.

One mechanism serves both. The adapters are injected with PEFT (`peft.inject_adapter_in_model`, never merged) and
left inactive, so every LoRA layer computes its base layer alone; `lora_scope` turns one on inside a block – for every
input (PEFT's active adapter), or for some batch rows (PEFT's mixed-adapter batches: ``adapter_names`` with
``"__base__"`` for the other rows, as ``PeftModel.generate(adapter_names=...)`` does). The base rows are never
touched: the base layer runs over the whole batch and only the adapter's rows get the low-rank update added, so
their numerics are the stock model's bit for bit. Which rows a prefill pooled travels with its KV cache
(`keep_pooled_rows` / `pooled_rows`), so decoding steps – `generate`'s and manual loops' – keep each row's scope.

Gradient checkpointing recomputes a layer after its forward pass has left the scope: the model wraps its
checkpoint function with `checkpoint_in_scope`, so the recomputation runs in the scope of the original pass.

The adapters' weights are saved with the model (full checkpoints) and with the heads (heads-only folders); the
config names them, so loading injects them first (`inject_scoped_lora`). PEFT is imported only when a model has one.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import re
from collections.abc import Sequence

import torch

# part -> (PEFT adapter name, where its target modules sit under the backbone, its default settings)
SCOPED_LORA_PARTS = {
    "language_model": ("arr_coc_lm", r"model\.language_model\.layers\.\d+\.self_attn\."),
    "vision": ("arr_coc_vision", r"model\.visual\.blocks\.\d+\.attn\."),
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

# the scopes entered now: (layers, adapter name, rows or None for every input)
_ACTIVE: contextvars.ContextVar[tuple] = contextvars.ContextVar("arr_coc_scoped_lora", default=())


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

    layers = dict(getattr(model, "_scoped_lora_layers", {}))
    for part, spec in specs.items():
        if part == "language_model":
            _check_rows_stay_apart(model)
        name, prefix = SCOPED_LORA_PARTS[part]
        pattern = _target_pattern(part, spec)
        if not any(re.fullmatch(pattern, n) for n, _ in model.vlm.named_modules()):
            raise ValueError(f"scoped_lora.{part}: target_modules {spec['target_modules']} match no module of the "
                             f"backbone (searched {prefix}NAME)")  # fmt: skip
        config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"], target_modules=pattern)
        trainable = {id(p): p.requires_grad for p in model.vlm.parameters()}
        inject_adapter_in_model(config, model.vlm, adapter_name=name)
        del model.vlm.peft_config  # the settings live in ArrCocConfig.scoped_lora; the backbone stays a plain model
        layers[part] = [m for m in model.vlm.modules() if isinstance(m, LoraLayer) and name in m.lora_A]
        for layer in layers[part]:
            layer._active_adapter = []  # inactive: the layer computes its base layer alone
        for p in model.vlm.parameters():  # PEFT freezes everything but the adapters: keep what was trainable
            p.requires_grad_(trainable.get(id(p), True))
    model._scoped_lora_layers = layers


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
    return part in getattr(model, "_scoped_lora_layers", {})


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
    """Inside the block, ``part``'s scoped LoRA (if the model has one) is on: ``on=True`` for every input, a [B] bool
    sequence for the batch rows marked True (dim 0 of each LoRA layer's input), False / None for none."""
    layers = getattr(model, "_scoped_lora_layers", {}).get(part)
    rows = None if isinstance(on, bool) or on is None else [bool(v) for v in on]
    if not layers or on is None or on is False or (rows is not None and not any(rows)):
        yield
        return
    entry = (tuple(layers), SCOPED_LORA_PARTS[part][0], None if rows is None or all(rows) else tuple(rows))
    with _entered((entry,)):
        yield


@contextlib.contextmanager
def _entered(entries: tuple):
    """Turn the adapters of ``entries`` on: PEFT's active adapter for every input, else its ``adapter_names``."""
    handles, previous = [], []
    try:
        for layers, name, rows in entries:
            if rows is None:
                for layer in layers:
                    previous.append((layer, layer._active_adapter))
                    layer._active_adapter = [name]
            else:
                names = [name if on else "__base__" for on in rows]
                hook = functools.partial(_adapter_names, names)
                handles += [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
        token = _ACTIVE.set(_ACTIVE.get() + entries)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
    finally:
        for handle in handles:
            handle.remove()
        for layer, active in reversed(previous):
            layer._active_adapter = active


def _adapter_names(names: list[str], module, args, kwargs):
    return args, {**kwargs, "adapter_names": names}


def checkpoint_in_scope(checkpoint):
    """A gradient-checkpoint function (``checkpoint(function, *args, **kwargs)``) whose recomputation, run by the
    backward pass after the forward pass has left its scopes, runs in the scopes of that forward pass."""

    def run(function, *args, **kwargs):
        return checkpoint(functools.partial(_in_scopes, _ACTIVE.get(), function), *args, **kwargs)

    return run


def _in_scopes(entries: tuple, function, *args, **kwargs):
    if _ACTIVE.get() == entries:
        return function(*args, **kwargs)
    with _entered(entries):
        return function(*args, **kwargs)


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
