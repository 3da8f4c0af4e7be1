"""Quantized checkpoints: swap the model's Linears for QuantLinears before loading, finish them after."""
from __future__ import annotations

import torch
from torch import nn

from .config import Qwen2Config
from .errors import BadCheckpoint

KEEP_FLOAT = ("lm_head", "embed_tokens", ".gate", "shared_expert_gate")


def swap_quantized_modules(model: nn.Module, config: Qwen2Config, *, dtype: torch.dtype) -> None:
    """Replace every quantized Linear (all but the head, embeddings and routers) with the checkpoint's QuantLinear."""
    from quant.config import QuantConfig
    from quant.linear import replace_linears

    try:
        quant_config = QuantConfig.from_hf(config.quantization_config or {})
    except ValueError as exc:
        raise BadCheckpoint(f"unsupported quantization_config: {exc}") from exc
    replace_linears(model, quant_config, dtype=dtype,
                    skip=lambda name: name.endswith(KEEP_FLOAT) or name.endswith(".mlp.gate"))


def finish_quantized_modules(model: nn.Module) -> None:
    """Convert loaded packed weights once into the fastest kernel layout for their device."""
    from quant.linear import QuantLinear

    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.post_load()
