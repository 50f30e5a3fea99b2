"""Loading arr-coc models: heads-only folders, device maps in the backbone's own module names, and the memory
a loaded model really takes. `ArrCocForConditionalGeneration.from_pretrained` / `from_backbone` use these.

A heads-only folder (written by `training.trainer.save_heads`) holds ``arr_coc_heads.safetensors`` (the relevance
heads, under ``relevance.`` – the saccade's own under ``saccade_relevance.`` – and any scoped LoRA's weights under their
names in the model), ``arr_coc_heads.json`` (the backbone's name and the arr-coc settings) and a
``config.json``; the backbone is loaded by the name it carries.
"""

from __future__ import annotations

import copy
import logging
import os

import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from .assets import resolve_model_path
from .io import hub_lookup_hint, prepare_local
from .scoped_lora import load_scoped_lora

HEADS_WEIGHTS = "arr_coc_heads.safetensors"
# bitsandbytes' 4-bit blocks (Params4bit's default; transformers passes none) and the rows its CPU kernel packs together
BNB_4BIT_BLOCKSIZE, BNB_CPU_BLOCK_N = 64, 32

logger = logging.getLogger(__name__)


# relevance weights added after 0.1.0 – 0.2.0: the budget head's survival slope; 0.3.0: the coupling scorer's context
# convolution – heads saved before lack them and load with their initial value (`ArrCocPreTrainedModel._init_weights`:
# a slope of zero, a context correction of zero, so older heads score as they did)
ADDED_SINCE_0_1_0 = (
    "budget.log_slope",
    "coupling.context_features.weight", "coupling.context_features.bias",
    "coupling.context.0.weight", "coupling.context.0.bias", "coupling.context.2.weight", "coupling.context.2.bias",
)  # fmt: skip


def _saved_heads(state: dict, prefix: str, heads, path: str) -> dict:
    """The weights under ``prefix`` in ``state`` for ``heads``; those added since 0.1.0 start at their init."""
    saved = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    own = heads.state_dict()
    missing = set(own) - set(saved)
    if missing and missing <= set(ADDED_SINCE_0_1_0):  # saved by an older arr-coc: the new ones start at their init
        saved.update({k: own[k] for k in missing})
    elif missing:
        raise RuntimeError(
            f"{path} lacks {prefix}* weights {sorted(missing)[:6]} that this model's heads have: it was saved by another "
            "version of arr-coc (this one loads heads saved by 0.1.0 and later) or for another configuration; load it "
            "with the arr-coc version that saved it, or retrain the heads (docs/training.md)"
        )
    return saved


def load_relevance_heads(model, folder: str) -> None:
    """Put the relevance heads saved in ``folder`` on ``model`` – the single encoding's (``relevance.*``) and, where the
    model has them, the saccade's own (``saccade_relevance.*``) – with the weights of its scoped LoRA adapters
    (`scoped_lora`): a heads-only folder (``arr_coc_heads.safetensors``) or a whole arr-coc checkpoint
    (``model.safetensors``).

    Raises `FileNotFoundError` when the folder has neither file, `RuntimeError` (from ``load_state_dict``) when
    the weights do not fit the model's heads, and `ValueError` when its scoped LoRA weights do not match the model's
    or it holds saccade heads of their own and the model has none, or the other way round (`ArrCocConfig.saccade_heads`).
    """
    from safetensors.torch import load_file

    candidates = [os.path.join(folder, name) for name in (HEADS_WEIGHTS, "model.safetensors")]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        raise FileNotFoundError(
            f"{folder} holds no relevance heads: expected {HEADS_WEIGHTS} (a heads-only folder) or model.safetensors "
            "(an arr-coc checkpoint)"
        )
    state = load_file(path)
    saved = any(k.startswith("saccade_relevance.") for k in state)
    if saved != (model.saccade_relevance is not None):
        raise ValueError(f"{path} holds {'' if saved else 'no '}heads of the saccade's own, and this model has "
                         f"{'no place for them' if saved else 'some'}: build it with saccade_heads={saved}")  # fmt: skip
    for name, heads in model.relevance_modules.items():
        heads.load_state_dict(_saved_heads(state, f"{name}.", heads, path))
    load_scoped_lora(model, state, path)


def load_backbone(model_or_path, options: dict):
    """The backbone of `from_backbone`: a loaded ``*ForConditionalGeneration`` as it is, or one loaded from a Hub id
    or local folder with ``options`` (`from_pretrained` loading options; safetensors only), or an arr-coc
    checkpoint's backbone. Raises `ValueError` for options given with an already loaded backbone or a
    ``device_map`` that splits tied embeddings, `FileNotFoundError` for a missing local folder."""
    if not isinstance(model_or_path, (str, os.PathLike)):
        if options:
            raise ValueError(f"unknown options {sorted(options)} for an already loaded backbone")
        return model_or_path
    path = resolve_model_path(model_or_path)
    prepare_local(path)
    with hub_lookup_hint(path):
        config = AutoConfig.from_pretrained(path)
    if isinstance(options.get("device_map"), dict):
        check_tied_placement(config, options["device_map"])
    options = fit_4bit_to_cpu(options, config, lambda: AutoModelForImageTextToText.from_config(config))
    vlm = AutoModelForImageTextToText.from_pretrained(path, **{"use_safetensors": True, **options})
    return vlm.vlm if vlm.config.model_type == "arr_coc" else vlm  # an arr-coc checkpoint: its backbone


def fit_4bit_to_cpu(options: dict, config, build) -> dict:
    """``options`` (`from_pretrained` loading options) whose bitsandbytes 4-bit config, when it quantizes onto the
    CPU, also skips the Linear layers bitsandbytes' CPU kernel cannot take; other options are returned as they are.

    bitsandbytes >= 0.49 repacks a 4-bit weight for its CPU kernel on the first forward pass on CPUs with
    AVX512-BF16, which needs in_features a multiple of the blocksize (64) and out_features a multiple of 32; any
    other Linear fails there (``RuntimeError: shape '[96, 0]' is invalid``, or an assertion) and works elsewhere.
    Those layers are kept unquantized on every host alike, so a model loads and answers the same everywhere; they
    are logged with the reason. Real backbones have none (their widths are multiples of 64); tiny ones do.
    ``config`` is the checkpoint's config (a checkpoint quantized already keeps its own layout); ``build()``
    constructs the model to load from it (run on the meta device, to read the layers' shapes).
    """
    from transformers import BitsAndBytesConfig

    quantization = options.get("quantization_config")
    if not (isinstance(quantization, BitsAndBytesConfig) and quantization.load_in_4bit):
        return options
    if getattr(config, "quantization_config", None) is not None or not _loads_on_cpu(options.get("device_map")):
        return options
    from transformers.quantizers.base import get_keys_to_not_convert

    with torch.device("meta"):
        model = build()
    unfit = [
        (name, module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and (module.in_features % BNB_4BIT_BLOCKSIZE or module.out_features % BNB_CPU_BLOCK_N)
    ]
    if not unfit:
        return options
    logger.warning(
        "bitsandbytes 4-bit on the CPU: keeping %d Linear layers unquantized because bitsandbytes' CPU kernel needs "
        "in_features a multiple of %d and out_features a multiple of %d: %s",
        len(unfit), BNB_4BIT_BLOCKSIZE, BNB_CPU_BLOCK_N, ", ".join(f"{n} ({i}->{o})" for n, i, o in unfit),
    )  # fmt: skip
    skips = quantization.llm_int8_skip_modules
    if skips is None:  # transformers' own default skips (the output embeddings, tied weights) still apply
        skips = get_keys_to_not_convert(model)
    quantization = copy.deepcopy(quantization)
    quantization.llm_int8_skip_modules = [*skips, *(name for name, _, _ in unfit)]
    return {**options, "quantization_config": quantization}


def _loads_on_cpu(device_map) -> bool:
    """Whether bitsandbytes quantizes onto the CPU under ``device_map``: none, or a strategy like "auto", where no
    accelerator is; a dict whose every value is the CPU (it leaves modules a mixed dict sends to the CPU unquantized);
    the CPU itself."""
    if device_map is None or device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return not torch.accelerator.is_available()
    if isinstance(device_map, dict):
        return all(_loads_on_cpu(d) for d in device_map.values()) if device_map else False
    return device_map != "disk" and torch.device(device_map).type == "cpu"


def check_tied_placement(config, device_map: dict) -> None:
    """A backbone whose lm_head shares the input embeddings needs both in one place (accelerate otherwise
    fails with "weight is on the meta device"). ``device_map`` uses the backbone's module names."""
    config = getattr(config, "vlm_config", config)
    if not getattr(config, "tie_word_embeddings", False):
        return

    def place(name: str):
        keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
        return device_map[max(keys, key=len)] if keys else None

    head, embeddings = place("lm_head"), place("model.language_model.embed_tokens")
    if head != embeddings and "disk" in (head, embeddings):
        raise ValueError(
            f"device_map puts lm_head on {head!r} and the input embeddings on {embeddings!r}, but this backbone ties "
            "them (tie_word_embeddings=True): place 'lm_head' with 'model.language_model' (e.g. both on 'disk')"
        )


def nested_device_map(path, device_map: dict) -> dict:
    """A ``device_map`` for an arr-coc checkpoint: one in the backbone's own module names (as for ``from_backbone``)
    is placed under ``vlm.``, with the heads (the saccade's own too) beside the first module not on disk; one already
    in arr-coc's names (``vlm...``, ``relevance``, ``saccade_relevance``) is returned as it is."""
    if any(k.split(".")[0] in ("vlm", "relevance", "saccade_relevance") for k in device_map):
        return device_map
    config = AutoConfig.from_pretrained(path)
    check_tied_placement(config, device_map)
    heads = next((d for d in device_map.values() if d not in ("disk", "meta")), "cpu")
    placed = {**{f"vlm.{k}" if k else "vlm": d for k, d in device_map.items()}, "relevance": heads}
    if getattr(config, "saccade_heads", False):
        placed["saccade_relevance"] = heads
    return placed


def memory_footprint(model: torch.nn.Module, return_buffers: bool = True) -> int:
    """Bytes of a model's weights (and buffers) as stored in memory; weights offloaded to disk (left on the meta
    device) count nothing."""
    tensors = {id(p): p for p in model.parameters()}
    if return_buffers:
        tensors.update({id(b): b for b in model.buffers()})
    return sum(stored_bytes(t) for t in tensors.values() if t.device.type != "meta")


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor takes as stored: a quantized tensor subclass (torchao) counts its packed data and scales."""
    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
        names, _ = data.__tensor_flatten__()
        return sum(stored_bytes(getattr(data, name)) for name in names)
    return data.numel() * data.element_size()
