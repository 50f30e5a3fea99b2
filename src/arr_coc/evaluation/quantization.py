"""The quantized loadings the loading benchmark and its tests compare against fp32, by name."""

from __future__ import annotations

import torch

QUANTIZATIONS = ("bnb-8bit", "bnb-4bit", "torchao-int8")


def quantization_config(name: str):
    """``"bnb-8bit"`` (LLM.int8 without outlier columns), ``"bnb-4bit"`` (NF4, fp32 compute) or ``"torchao-int8"`` (int8 weight-only)
    -> the `transformers` quantization config to pass to ``from_pretrained``."""
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if name == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    if name == "bnb-8bit":  # threshold 0: no outlier columns picked across the batch, so rows stay apart (scoped LoRA)
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    if name == "bnb-4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    raise ValueError(f"unknown quantization {name!r}; expected one of {QUANTIZATIONS}")
