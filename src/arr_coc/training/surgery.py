"""Model surgery for training: freeze/unfreeze by part, optimizer parameter groups with per-part
learning rates and layer-wise decay, replacing a relevance head, LoRA on the language model, and a
report of trainable vs frozen parameters.

Parts are named like the model's modules (the backbone adapter knows where they live)::

    "vision_encoder"        the vision tower without its merger
    "merger"                the vision-to-language projection
    "language_model"        every decoder layer, the embeddings and the final norm
    "language_model.layers.3"   one decoder layer (any index)
    "lm_head"               the output projection (tied to the embeddings in small Qwen models)
    "relevance"             all relevance heads; "relevance.coupling" etc. for one
    "saccade_relevance"     the saccade's own heads, likewise (only when the model has them: `add_saccade_heads`)
    "language_model.lora"   the language model's scoped LoRA, "vision_encoder.lora" the vision tower's (only when
                            the model has one: `arr_coc.scoped_lora`)

Example::

    freeze(model, "all"); unfreeze(model, "relevance", "language_model.layers.27")
    groups = parameter_groups(model, {"relevance": 1e-3, "language_model": 2e-5}, layer_decay=0.9)
    optimizer = torch.optim.AdamW(groups)
"""

from __future__ import annotations

import re
from collections import OrderedDict

from torch import nn

from ..scoped_lora import has_scoped_lora, scoped_lora_parameters

HEADS = ("information", "salience", "coupling", "balancer", "budget")


def part_modules(model) -> OrderedDict[str, nn.Module]:
    """Every named part of an arr-coc model (see the module docstring)."""
    vlm = model.vlm
    inner = vlm.model
    visual, language = inner.visual, inner.language_model
    parts = OrderedDict()
    parts["vision_encoder"] = _Without(visual, visual.merger)
    parts["merger"] = visual.merger
    parts["language_model"] = language
    for i, layer in enumerate(language.layers):
        parts[f"language_model.layers.{i}"] = layer
    parts["lm_head"] = vlm.lm_head
    for prefix, heads in model.relevance_modules.items():
        parts[prefix] = heads
        for name in HEADS:
            parts[f"{prefix}.{name}"] = getattr(heads, name)
    for lora, name in (("language_model", "language_model.lora"), ("vision", "vision_encoder.lora")):
        if has_scoped_lora(model, lora):
            parts[name] = _Parameters(scoped_lora_parameters(model, lora).values())
    return parts


class _Without:
    """A module's parameters minus those of one of its children (the vision tower without its merger)."""

    def __init__(self, module: nn.Module, excluded: nn.Module):
        self.module, self.excluded = module, excluded

    def parameters(self):
        skip = {id(p) for p in self.excluded.parameters()}
        return (p for p in self.module.parameters() if id(p) not in skip)


class _Parameters:
    """A fixed set of parameters as a part (a scoped LoRA's, spread over many modules)."""

    def __init__(self, params):
        self.params = list(params)

    def parameters(self):
        return iter(self.params)


def _resolve(model, names) -> list:
    parts = part_modules(model)
    out = []
    for name in names:
        if name == "all":
            out.append(model)
        elif name in parts:
            out.append(parts[name])
        else:
            raise ValueError(f"unknown part {name!r}; expected 'all' or one of {list(parts)}")
    return out


def freeze(model, *parts: str) -> None:
    """Stop gradients to the named parts."""
    for module in _resolve(model, parts):
        for p in module.parameters():
            p.requires_grad_(False)


def unfreeze(model, *parts: str) -> None:
    """Train the named parts."""
    for module in _resolve(model, parts):
        for p in module.parameters():
            p.requires_grad_(True)


def parameter_groups(model, learning_rates: dict[str, float], layer_decay: float | None = None,
                     weight_decay: float = 0.0) -> list[dict]:  # fmt: skip
    """Optimizer parameter groups for the trainable parameters.

    ``learning_rates`` maps part names to learning rates; a parameter takes the rate of the most
    specific part that holds it, and every trainable parameter must be covered (else `ValueError`).
    With ``layer_decay`` the decoder layer ``i`` of ``L`` gets the language model's rate times
    ``layer_decay ** (L - 1 - i)``; the final norm counts as the top layer, the embeddings as layer -1.
    Biases and norms get no weight decay.
    """
    parts = part_modules(model)
    for name in learning_rates:
        if name not in parts:
            raise ValueError(f"unknown part {name!r} in learning_rates; expected one of {list(parts)}")
    owner: dict[int, str] = {}
    # most specific last: parts are ordered from general to specific within each family of names
    for name in sorted(learning_rates, key=lambda n: n.count(".")):
        for p in parts[name].parameters():
            owner[id(p)] = name
    language = model.vlm.model.language_model
    n_layers = len(language.layers)
    layer_of = {id(p): n_layers - 1 for p in language.norm.parameters()}  # the final norm sits on top
    for i, layer in enumerate(language.layers):
        for p in layer.parameters():
            layer_of[id(p)] = i
    uncovered = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owner]
    if uncovered:
        raise ValueError(f"trainable parameters without a learning rate: {uncovered[:5]}{' ...' if len(uncovered) > 5 else ''}; "
                         f"add their part to learning_rates or freeze them")  # fmt: skip
    groups: dict[tuple, dict] = {}
    for pname, p in model.named_parameters():
        if not p.requires_grad or id(p) not in owner:
            continue
        part = owner[id(p)]
        lr = learning_rates[part]
        if layer_decay is not None and part == "language_model":
            depth = layer_of.get(id(p), -1)
            lr *= layer_decay ** (n_layers - 1 - depth)
        decay = 0.0 if (p.ndim < 2 or re.search(r"norm|bias", pname)) else weight_decay
        key = (part, lr, decay)
        groups.setdefault(key, {"params": [], "lr": lr, "weight_decay": decay, "name": f"{part}@{lr:.3g}"})[
            "params"
        ].append(p)
    return list(groups.values())


def replace_head(model, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` in place of relevance head ``name``; it must take the same call as the old one."""
    if name not in HEADS:
        raise ValueError(f"unknown relevance head {name!r}; expected one of {HEADS}")
    old = getattr(model.relevance, name)
    setattr(model.relevance, name, module)
    return old


def add_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules=("q_proj", "v_proj"),
             layers: list[int] | None = None):  # fmt: skip
    """LoRA adapters (PEFT) on the language model's attention projections; returns the PEFT config.

    The arr-coc model stays the object you train and save; the LoRA matrices train, and so does
    whatever was trainable before.
    """
    from peft import LoraConfig, inject_adapter_in_model

    pattern = r"vlm\.model\.language_model\.layers\.(\d+)\.self_attn\.(" + "|".join(target_modules) + r")"
    if layers is not None:
        pattern = (
            r"vlm\.model\.language_model\.layers\.("
            + "|".join(str(i) for i in layers)
            + r")\.self_attn\.("
            + "|".join(target_modules)
            + r")"
        )
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    inject_adapter_in_model(config, model)
    for p in model.parameters():  # PEFT freezes everything but the adapters: keep what was trainable
        if id(p) in trainable:
            p.requires_grad_(True)
    return config


def report(model) -> dict:
    """Trainable vs frozen parameter counts, in total and per part."""
    parts = part_modules(model)
    rows = OrderedDict()
    for name, module in parts.items():
        params = list(module.parameters())
        rows[name] = {
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "frozen": sum(p.numel() for p in params if not p.requires_grad),
        }
    total_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": total_trainable, "frozen": total - total_trainable, "parts": rows}


def format_report(summary: dict) -> str:
    lines = [f"trainable {summary['trainable']:,} | frozen {summary['frozen']:,}"]
    for name, row in summary["parts"].items():
        if row["trainable"] or "." not in name:
            lines.append(f"  {name:32s} trainable {row['trainable']:>12,}  frozen {row['frozen']:>12,}")
    return "\n".join(lines)


def set_gradient_checkpointing(model, enabled: bool = True) -> None:
    """Recompute the backbone's activations in backward to save memory."""
    if enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
