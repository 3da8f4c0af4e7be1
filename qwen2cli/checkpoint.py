"""Safetensors checkpoints -> a model: build on the meta device, swap quantized modules, load with assign=True."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Qwen2Config, load_config, with_context
from .errors import BadCheckpoint, BadInput
from .load_options import DEFAULT_LOAD, LoadOptions
from .model import Qwen2ForCausalLM
from .quantized_load import (
    block_modules,
    block_tensor_names,
    finish_quantized_modules,
    fuse_projections,
    install_int8_head,
    quantizable_linears,
    quantize_at_load,
    swap_quantized_modules,
)
from .weights import read_state_dict, release_freed_memory, tensor_homes, weight_files

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: Qwen2ForCausalLM
    config: Qwen2Config  # as built: with YaRN or dual chunk attention when the options asked for them
    device: torch.device
    dtype: torch.dtype
    ctx: int  # the context the options resolved to (LoadOptions.context_for the checkpoint's trained context)


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; refuse 'cuda' without a GPU (LoadOptions has checked the name)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput("--device cuda asked for, but torch sees no CUDA GPU (is the CUDA build of torch installed?)")
    return torch.device(device)


def resolve_dtype(dtype: str, config: Qwen2Config, device: torch.device) -> torch.dtype:
    """'auto' -> the checkpoint's dtype on CUDA. On CPU, bfloat16 and float16 checkpoints run in bfloat16 (loaded
    without a copy; bfloat16 decodes faster than float32 on every CPU measured, and decoding dominates a chat's time);
    float32 checkpoints stay float32, exact and loaded without a conversion. Where the CPU has no native
    bfloat16 arithmetic, `--dtype float32` prefills long prompts faster (docs/performance.md)."""
    if dtype != "auto":
        return DTYPES[dtype]  # a name LoadOptions has checked
    if device.type == "cuda":
        return DTYPES.get(config.torch_dtype or "", torch.bfloat16)
    return torch.float32 if config.torch_dtype == "float32" else torch.bfloat16


def _target(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> tuple[torch.dtype, torch.device]:
    """Floating tensors in the compute dtype; integer (packed) tensors keep theirs."""
    return (dtype if tensor.is_floating_point() else tensor.dtype), device


def load_model(model_dir: Path, options: LoadOptions = DEFAULT_LOAD) -> LoadedModel:
    """Load a checkpoint directory into a ready-to-run model in eval mode as `options` say. `load_in` quantizes an
    unquantized checkpoint's Linears as it loads. The head (and a tied embedding) runs as int8 rows for quantized
    models (a checkpoint's or load_in's) on CPU, where the bfloat16 head was a third of a decoded token's time and
    of the model's memory, unless `float_head`."""
    model_dir = Path(model_dir)
    stored = load_config(model_dir)
    config = with_context(stored, options.ctx, attention=options.attention)
    load_in = options.load_in
    if load_in is not None and config.quantization_config is not None:
        raise BadInput(f"{model_dir} is already quantized; --load-in is for unquantized checkpoints")
    torch_device = resolve_device(options.device)
    torch_dtype = resolve_dtype(options.dtype, config, torch_device)
    files = weight_files(model_dir)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    quantized = config.quantization_config is not None
    if quantized:
        swap_quantized_modules(model, config, dtype=torch_dtype)
    blocks: dict = {}
    if quantized:
        blocks = block_modules(config)  # a GGUF import's: its head is stored quantized already
    int8_head = (
        not options.float_head and torch_device.type == "cpu" and (quantized or load_in is not None)
    ) and "lm_head" not in blocks
    head_names: frozenset[str] = frozenset()
    home = tensor_homes(files) if quantized or int8_head else {}  # read once for the head and for repacking
    if int8_head:
        head_names = install_int8_head(model, config, home)
    # On CPU an untied embedding table keeps its stored dtype (rows are cast as they are looked up): it stays a
    # view of the file, and only the rows a prompt uses are ever read into memory
    lookup_only = (
        {"model.embed_tokens.weight"} if torch_device.type == "cpu" and not config.tie_word_embeddings else set()
    )
    if blocks:
        lookup_only |= block_tensor_names(blocks)  # the kernels read them as stored
    # --load-in: each float Linear weight is read once, quantized, then dropped
    transient: frozenset[str] = frozenset()
    if load_in is not None:
        transient = frozenset(f"{name}.weight" for name in quantizable_linears(model))
    state = read_state_dict(
        files,
        lambda name, t: (t.dtype, t.device) if name in lookup_only else _target(t, torch_dtype, torch_device),
        transient,
        skip=head_names,
    )
    if config.tie_word_embeddings:  # the head reads the embedding's tensors (a weight, or block codes and tables)
        for name in [name for name in state if name.startswith("model.embed_tokens.")]:
            state["lm_head." + name.removeprefix("model.embed_tokens.")] = state[name]
    expected = set(model.state_dict().keys())
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) ({', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s) ({', '.join(unexpected[:3])})")
        raise BadCheckpoint(f"{model_dir}: weights do not match config.json: {'; '.join(parts)}")
    for name, tensor in state.items():
        expected_shape = _shape_of(model, name)
        if tuple(tensor.shape) != expected_shape:
            raise BadCheckpoint(f"{name} has shape {tuple(tensor.shape)}, config.json implies {expected_shape}")
    model.load_state_dict(state, strict=True, assign=True)
    del state  # the model holds what it uses; what --load-in replaces is freed as it goes
    if config.tie_word_embeddings and not int8_head and "lm_head" not in blocks:
        model.lm_head.weight = model.model.embed_tokens.weight
    if quantized:
        finish_quantized_modules(model, home)
    if load_in is not None:
        quantize_at_load(model, load_in, device=torch_device)
    if quantized or load_in is not None:
        from .native_decode import NativeDecoder

        fuse_projections(model)
        model.fast_decode = NativeDecoder.build(model)
    model.eval().requires_grad_(False)
    release_freed_memory()
    ctx = options.context_for(stored.max_position_embeddings)
    return LoadedModel(model=model, config=config, device=torch_device, dtype=torch_dtype, ctx=ctx)


def _shape_of(model: torch.nn.Module, name: str) -> tuple[int, ...]:
    module_name, _, attribute = name.rpartition(".")
    return tuple(getattr(model.get_submodule(module_name), attribute).shape)
