"""Quantized checkpoints: swap the model's Linears for QuantLinears before loading, finish them after."""

from __future__ import annotations

import functools
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Qwen2Config
from .errors import BadCheckpoint, MissingDependency
from .weights import StoredRows, corrupt, release_freed_memory

KEEP_FLOAT = ("lm_head", "embed_tokens", ".gate", "shared_expert_gate")


def keeps_float(name: str) -> bool:
    """Whether the Linear at this qualified name stays unquantized: the head, embeddings and MoE routers/gates."""
    return name.endswith(KEEP_FLOAT)


BLOCKS_METHOD = "gguf-blocks"  # GGUF imports: block codes per module (quant.blocks, docs/gguf-layout.md)
BLOCK_TENSORS = ("codes", "scales", "zeros", "offsets")


def block_modules(config: Qwen2Config) -> dict[str, dict[str, Any]]:
    """A GGUF import's block-quantized modules (qualified name -> quant.blocks.BlockFormat JSON); {} otherwise."""
    quant = config.quantization_config or {}
    if quant.get("quant_method") != BLOCKS_METHOD:
        return {}
    modules = quant.get("modules")
    if not isinstance(modules, dict):
        raise BadCheckpoint("quantization_config of gguf-blocks has no modules table")
    if config.tie_word_embeddings and "model.embed_tokens" in modules:
        modules = {**modules, "lm_head": modules["model.embed_tokens"]}  # the head reads the embedding's tensors
    return modules


def block_tensor_names(modules: dict[str, dict[str, Any]]) -> set[str]:
    """The stored names of block modules' tensors: they keep their dtypes (float16 scales are the kernels')."""
    return {f"{name}.{suffix}" for name in modules for suffix in BLOCK_TENSORS}


def _swap_block_modules(model: nn.Module, modules: dict[str, dict[str, Any]], *, dtype: torch.dtype) -> None:
    from .quant.blocks import BlockEmbedding, BlockFormat, BlockQuantLinear

    for name, data in modules.items():
        try:
            fmt = BlockFormat.from_json(data)
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            sub = getattr(parent, attribute)
            if isinstance(sub, nn.Linear):
                replacement: nn.Module = BlockQuantLinear(
                    sub.in_features,
                    sub.out_features,
                    bias=sub.bias is not None,
                    fmt=fmt,
                    dtype=dtype,
                    device=sub.weight.device,
                )
            elif isinstance(sub, nn.Embedding):
                replacement = BlockEmbedding(sub.num_embeddings, sub.embedding_dim, fmt=fmt, device=sub.weight.device)
            else:
                raise ValueError(f"{name} is neither a Linear nor an embedding")
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise BadCheckpoint(f"unsupported block module {name!r} in quantization_config: {exc}") from exc
        setattr(parent, attribute, replacement)


def swap_quantized_modules(model: nn.Module, config: Qwen2Config, *, dtype: torch.dtype) -> None:
    """Replace every quantized Linear (all but the head, embeddings and routers) with the checkpoint's QuantLinear;
    a GGUF import's listed modules (head and embedding included) with block modules."""
    from .quant.config import QuantConfig
    from .quant.convert import replace_linears

    modules = block_modules(config)
    if modules:
        _swap_block_modules(model, modules, dtype=dtype)
        return
    try:
        quant_config = QuantConfig.from_hf(config.quantization_config or {})
    except ValueError as exc:
        raise BadCheckpoint(f"unsupported quantization_config: {exc}") from exc
    replace_linears(model, quant_config, dtype=dtype, skip=keeps_float)


# Linears repacked between handing the freed heap back to the system: repacking's temporaries otherwise pile up in
# glibc's heap and double the peak memory of a load; after every one, loading took ~1 s longer, after every 8 no longer
RELEASE_EVERY = 8


def use_kernel_cache() -> None:
    """Native kernels (quant/native.py) build into the store's cache, once per source version."""
    from .paths import kernel_cache_dir
    from .quant import native as quant_native

    if quant_native.cache_dir is None:
        quant_native.cache_dir = kernel_cache_dir()


OWN_READ_BYTES = 64 << 20  # a tensor read for post_load by plain reads, not a mapping, from this size on (the head)


def _rows(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return tensor[start:stop]


def finish_quantized_modules(model: nn.Module, home: dict[str, Path] | None = None) -> None:
    """Convert loaded packed weights once into the fastest kernel layout for their device.

    With `home` (which checkpoint file holds each tensor: weights.tensor_homes), the packed integers are read
    for this through mappings of their own, dropped every RELEASE_EVERY Linears: the modules' buffers (memory-mapped
    views, kept for the reference path and for saving) are then never read, and stay out of resident memory beside
    the kernels' copy. Modules that take them (`reads_rows`) get functions giving blocks of rows instead, reading a
    tensor over OWN_READ_BYTES by plain reads, so that not even a mapping holds all of it at once."""
    from safetensors import safe_open

    from .quant.linear import QuantLinear

    use_kernel_cache()
    home = home or {}
    modules = [(name, module) for name, module in model.named_modules() if isinstance(module, QuantLinear)]
    by_rows: dict[Path, StoredRows] = {}
    for begin in range(0, len(modules), RELEASE_EVERY):
        with ExitStack() as stack:
            handles: dict[Path, Any] = {}
            for name, module in modules[begin : begin + RELEASE_EVERY]:
                wanted, needed = module.stored_for_post_load()
                stored = {key: home[f"{name}.{key}"] for key in wanted if f"{name}.{key}" in home}
                packed: dict[str, Any] | None = None
                if needed <= stored.keys() and module.on_cpu():
                    for path in stored.values():
                        if path not in handles:
                            handles[path] = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                    packed = {key: handles[path].get_tensor(f"{name}.{key}") for key, path in stored.items()}
                    if module.reads_rows:  # rows of the views; a big tensor's by plain reads, a block at a time
                        for key, path in stored.items():
                            if packed[key].nbytes > OWN_READ_BYTES:
                                rows = by_rows[path] = by_rows.get(path) or StoredRows(path)
                                packed[key] = rows.reader(f"{name}.{key}")
                            else:
                                packed[key] = functools.partial(_rows, packed[key])
                module.post_load(packed)
            del packed, handles  # the last views of this batch's mappings
        release_freed_memory()


def fuse_projections(model: nn.Module) -> None:
    """q/k/v, and gate/up, of each block as one kernel call where their kernels allow (quant.convert.fuse_native)."""
    from .model import MLP, Attention, Fused
    from .quant.convert import fuse_native
    from .quant.linear import DEQUANT_MIN_ROWS, QuantLinear

    for index, module in enumerate(model.modules()):
        if index % RELEASE_EVERY == 0:  # the tables each fused one replaced are freed: hand them back as for repacking
            release_freed_memory()
        names: tuple[str, ...]
        if isinstance(module, Attention):
            names, slot = ("q_proj", "k_proj", "v_proj"), "fused_qkv"
        elif isinstance(module, MLP):
            names, slot = ("gate_proj", "up_proj"), "fused_gate_up"
        else:
            continue
        layers = [getattr(module, name) for name in names]
        if all(isinstance(layer, QuantLinear) for layer in layers):
            fused = fuse_native(layers)
            if fused is not None:
                # long inputs unpack the weight for one float32 GEMM: there the fused weight, twice the size,
                # made a 512-token prefill 16% slower (gate/up: 35 MB of float32 against two of 17)
                setattr(
                    module,
                    slot,
                    Fused(fused, layers, [layer.out_features for layer in layers], max_rows=DEQUANT_MIN_ROWS - 1),
                )


def install_int8_head(model: nn.Module, config: Qwen2Config, home: dict[str, Path]) -> frozenset[str]:
    """The head as int8 rows quantized straight from the file's rows (quant.head), serving the embedding's lookups
    too when tied; the float table is never whole in memory. Returns the stored tensors it stands for (the head's,
    and with tied weights the embedding's), which loading then need not read."""
    from safetensors import SafetensorError, safe_open

    from .quant.head import Int8Lookup, Int8Rows

    use_kernel_cache()  # the head is the first to ask for the kernels: built once into the store, not per process
    source = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    path = home.get(source)
    if path is None:
        raise BadCheckpoint(f"the checkpoint has no {source}")
    expected = (config.vocab_size, config.hidden_size)

    def read(begin: int, end: int) -> torch.Tensor:
        # a mapping of its own per chunk: the file pages read stay resident only as long as the chunk is quantized
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return handle.get_tensor(source)[begin:end].clone()  # a view of the file until copied

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            shape = tuple(handle.get_tensor(source).shape)
        if shape != expected:
            raise BadCheckpoint(f"{source} has shape {shape}, config.json implies {expected}")
        table = Int8Rows.from_rows(read, *expected)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise corrupt(path, exc) from exc
    model.lm_head = table
    if config.tie_word_embeddings:
        model.get_submodule("model").embed_tokens = Int8Lookup(table)
        return frozenset({"lm_head.weight", "model.embed_tokens.weight"})
    return frozenset({"lm_head.weight"})


def quantize_at_load(model: nn.Module, load_in: str, *, device: torch.device) -> str:
    """`--load-in 8bit|4bit` (LoadOptions checked the name): quantize an unquantized model's Linears as it loads
    (not the head, embeddings or routers). CUDA: bitsandbytes (LLM.int8 / NF4). CPU: our round-to-nearest, int8 per
    channel or int4 in groups of 128 (asymmetric), on torch's packed CPU kernels. Returns what was used, for `info`."""
    if device.type == "cuda":
        return _bitsandbytes(model, load_in, keeps_float)
    from .quant.config import QuantConfig
    from .quant.convert import quantize_linear

    use_kernel_cache()
    pending = list(_float_linears(model, keeps_float).values())[::-1]
    while pending:  # popped, so each float weight is freed once replaced, not at the end (peak memory)
        child, attribute, sub = pending.pop()
        if len(pending) % RELEASE_EVERY == 0:
            release_freed_memory()
        if load_in == "8bit":
            config = QuantConfig(method="rtn", bits=8, group_size=-1, sym=True)
        else:
            size = next((g for g in (128, 64, 32) if sub.in_features % g == 0), -1)
            config = QuantConfig(method="rtn", bits=4, group_size=size, sym=False)
        replacement = quantize_linear(sub, config).to(sub.weight.device)
        replacement.post_load()
        setattr(child, attribute, replacement)
    return f"rtn-int{load_in[0]} (cpu kernels)"


def _bitsandbytes(model: nn.Module, load_in: str, keep) -> str:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise MissingDependency("--load-in on CUDA needs bitsandbytes: pip install 'qwen2cli[cuda]'") from exc
    for child, attribute, sub in _float_linears(model, keep).values():
        if load_in == "8bit":
            layer = bnb.nn.Linear8bitLt(
                sub.in_features, sub.out_features, bias=sub.bias is not None, has_fp16_weights=False, threshold=6.0
            )
            layer.weight = bnb.nn.Int8Params(sub.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(
                sub.in_features,
                sub.out_features,
                bias=sub.bias is not None,
                compute_dtype=sub.weight.dtype,
                quant_type="nf4",
            )
            layer.weight = bnb.nn.Params4bit(sub.weight.data.cpu(), requires_grad=False, quant_type="nf4")
        if sub.bias is not None:
            layer.bias = nn.Parameter(sub.bias.data, requires_grad=False)
        setattr(child, attribute, layer.to(sub.weight.device))  # bitsandbytes quantizes on the move to CUDA
    return f"bitsandbytes {'int8' if load_in == '8bit' else 'nf4'}"


def quantizable_linears(model: nn.Module) -> list[str]:
    """Qualified names of the Linears that `--load-in` quantizes."""
    return list(_float_linears(model, keeps_float))


def _float_linears(model: nn.Module, keep) -> dict[str, tuple[nn.Module, str, nn.Linear]]:
    """Qualified name -> (parent, attribute, Linear) for every nn.Linear whose qualified name `keep` does not
    claim."""
    found = {}
    for name, child in model.named_modules():
        for attribute, sub in child.named_children():
            qualified = f"{name}.{attribute}" if name else attribute
            if isinstance(sub, nn.Linear) and not keep(qualified):
                found[qualified] = (child, attribute, sub)
    return found
