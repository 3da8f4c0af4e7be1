"""Quantize a checkpoint layer by layer (GPTQ, AWQ or RTN) into the standard GPTQ or AWQ checkpoint format."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .calibration import calibration_batches, default_calibration_text
from .config import quantization_for
from .errors import BadCheckpoint
from .generate import Engine
from .kv_cache import KVCache
from .quantized_load import keeps_float

COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
    "LICENSE",
)


def _quantizable(layer: nn.Module) -> dict[str, nn.Linear]:
    return {
        name: module
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear) and not keeps_float(name)
    }


def _forward_precision(device: torch.device):
    """bfloat16 autocast for calibration forwards on CPUs that multiply bfloat16 natively (see _run_layer)."""
    from .quant.linear import long_input_dtype

    fast = device.type == "cpu" and long_input_dtype() == torch.bfloat16
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast)


def _run_layer(layer: nn.Module, hidden: torch.Tensor, rope, config, *, batch: int = 8) -> torch.Tensor:
    """One decoder layer over every calibration sample, a few samples at a time. On CPUs that multiply bfloat16
    natively (quant.linear.long_input_dtype) its products run in bfloat16 under autocast, the residual stream and
    the Hessians staying float32: GPU GPTQ runs its calibration in the model's 16-bit dtype too, and the forwards
    were most of a 0.5B quantization's time here (oneDNN's bfloat16 GEMM ~4x MKL's float32 one on this CPU)."""
    outputs = []
    with _forward_precision(hidden.device):
        for begin in range(0, hidden.shape[0], batch):
            piece = hidden[begin : begin + batch]
            cache = KVCache(config, piece.shape[1], batch_size=piece.shape[0], dtype=piece.dtype, device=piece.device)
            outputs.append(layer(piece, rope, cache, 0).float())
    return torch.cat(outputs)


STAGES = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def _stages(linears: dict[str, nn.Linear]) -> list[dict[str, nn.Linear]]:
    """True-sequential order: attention inputs, attention output, MLP inputs (experts too), MLP output."""
    stages = [
        {name: linear for name, linear in linears.items() if name.rsplit(".", 1)[-1] in suffixes} for suffixes in STAGES
    ]
    rest = {name: linear for name, linear in linears.items() if not any(name in stage for stage in stages)}
    return [stage for stage in [*stages, rest] if stage]


class _Captured(Exception):
    """Raised by a hook once the last input a stage needs has been seen: the rest of the layer need not run."""


def _gptq_stage(
    layer: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor, rope, config, quant_config
) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """Collect the Hessians of these Linears over the calibration inputs, then GPTQ each of them. Returns the
    packed QuantLinears, and float Linears holding the same dequantized weights for the later stages to run on
    (the same function, without unpacking on every call)."""
    from .quant.gptq import GPTQ
    from .quant.linear import QuantLinear

    # Linears under one parent in one stage read the same input (q/k/v; gate/up): one Hessian serves them all
    collectors: dict[str, GPTQ] = {}
    readers: dict[str, str] = {}
    for name, linear in linears.items():
        parent = name.rpartition(".")[0]
        if parent not in readers:
            readers[parent] = name
            collectors[name] = GPTQ(linear.in_features, device=linear.weight.device)
        collectors[name] = collectors[readers[parent]]
    last = list(readers.values())[-1] if len(readers) == 1 else None  # one reader: stop the layer right there

    def collect(name: str, inputs: torch.Tensor) -> None:
        with torch.autocast("cpu", enabled=False):  # the Hessian in float32, whatever _run_layer multiplies in
            collectors[name].add_batch(inputs)
        if name == last:
            raise _Captured

    hooks = [
        linears[name].register_forward_pre_hook(lambda m, args, n=name: collect(n, args[0]))
        for name in readers.values()
    ]
    try:
        for begin in range(0, hidden.shape[0], 8):
            try:
                _run_layer(layer, hidden[begin : begin + 8], rope, config)
            except _Captured:
                pass
    finally:
        for hook in hooks:
            hook.remove()
    packed, simulated = {}, {}
    for reader in readers.values():
        # GPTQ treats output rows independently given H: the Linears sharing a Hessian are quantized as one
        # stacked weight, one inverse and one pass over the columns instead of one each
        names = [name for name in linears if collectors[name] is collectors[reader]]
        stacked = torch.cat([linears[name].weight.detach() for name in names])
        result = collectors[reader].quantize(
            stacked,
            bits=quant_config.bits,
            group_size=quant_config.group_size,
            sym=quant_config.sym,
            desc_act=quant_config.desc_act,
            static_groups=quant_config.static_groups,
            damp_percent=quant_config.damp_percent,
            mse=quant_config.mse,
            shrink=quant_config.hessian_shrink,
        )
        begin = 0
        for name in names:
            linear = linears[name]
            end = begin + linear.out_features
            packed[name] = QuantLinear.from_quantized(
                result.codes[begin:end],
                result.scales[:, begin:end],
                result.zeros[:, begin:end],
                result.g_idx.clone(),
                linear.bias,
                quant_config,
            )
            simulated[name] = _stand_in(linear, packed[name])
            begin = end
    return packed, simulated


def _replace(layer: nn.Module, replacements: dict[str, nn.Module]) -> None:
    for name, replacement in replacements.items():
        parent, _, attribute = name.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, attribute, replacement)


def _stand_in(linear: nn.Linear, packed: nn.Module) -> nn.Linear:
    """A float Linear computing what `packed` computes, for running calibration data through the layer."""
    stand_in = torch.nn.utils.skip_init(
        nn.Linear, linear.in_features, linear.out_features, bias=linear.bias is not None
    )  # no random init of a weight replaced next
    stand_in.weight = nn.Parameter(packed.dequantized_weight(), requires_grad=False)
    if linear.bias is not None:
        stand_in.bias = nn.Parameter(packed.bias.float(), requires_grad=False)
    return stand_in


def quantize_model(
    engine: Engine,
    out_dir: Path,
    *,
    method: str,
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool,
    calibration: str | None,
    samples: int,
    seq_len: int,
    static_groups: bool = False,
    damp_percent: float = 0.01,
    mse: float = 0.0,
    hessian_shrink: float | None = None,
    awq_clip: bool = False,
    replace_output: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """GPTQ (or RTN) every decoder Linear, each layer fed by the already-quantized layers before it; save."""
    from .quant.linear import quantize_linear

    quant_config = quantization_for(
        engine.config,
        method=method,
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=desc_act,
        static_groups=static_groups,
        damp_percent=damp_percent,
        mse=mse if method == "gptq" else 0.0,
        hessian_shrink=hessian_shrink,
    )
    model = engine.loaded.model
    config = engine.config
    with torch.inference_mode():
        hidden = None
        if method in ("gptq", "awq"):
            batches = calibration_batches(
                engine, calibration or default_calibration_text(), samples=samples, seq_len=seq_len
            )
            hidden = model.model.embed_tokens(batches.to(engine.loaded.device)).float()
            rope = model._rope_tables(0, seq_len, hidden.device)
        for index, layer in enumerate(model.model.layers):
            layer.float()  # layers wait in the checkpoint's dtype (views of its files): one float32 layer at a time
            if method == "gptq":
                packed: dict[str, nn.Module] = {}
                for stage in _stages(_quantizable(layer)):  # each stage sees the stages before it quantized
                    stage_packed, simulated = _gptq_stage(layer, stage, hidden, rope, config, quant_config)
                    _replace(layer, simulated)
                    packed.update(stage_packed)
                hidden = _run_layer(layer, hidden, rope, config)  # the next layer sees quantized outputs
                _replace(layer, packed)
            elif method == "awq":
                from .quantize_awq import awq_layer

                packed, simulated = awq_layer(layer, hidden, rope, config, quant_config, clip=awq_clip)
                _replace(layer, simulated)
                hidden = _run_layer(layer, hidden, rope, config)
                _replace(layer, packed)
            else:
                _replace(
                    layer, {name: quantize_linear(linear, quant_config) for name, linear in _quantizable(layer).items()}
                )
            if progress is not None:
                progress(f"quantizing ({method} int{bits})", index + 1, len(model.model.layers))
    return save_quantized(engine, out_dir, quant_config, replace=replace_output)


def save_quantized(engine: Engine, out_dir: Path, quant_config, *, replace: bool = False) -> Path:
    """A complete model directory: config.json with quantization_config, quantize_config.json, safetensors, tokenizer.
    Written beside `out_dir` and renamed into place; `replace`: a model already there is replaced (output_dir.py)."""
    from .checkpoint import save_weights
    from .output_dir import written_in_place

    try:
        with written_in_place(out_dir, replace=replace) as staging:
            state = engine.loaded.model.state_dict()  # the tensors themselves: each is made float16 as it is written
            if engine.config.tie_word_embeddings:
                state.pop("lm_head.weight", None)
            save_weights(state, staging / "model.safetensors", float_dtype=torch.float16)
            raw = json.loads((engine.model_dir / "config.json").read_text())
            raw.update(quantization_config=quant_config.to_hf(), torch_dtype="float16")
            raw.pop("dtype", None)
            (staging / "config.json").write_text(json.dumps(raw, indent=2))
            (staging / "quantize_config.json").write_text(json.dumps(quant_config.to_hf(), indent=2))
            for name in COPIED_FILES:
                if (engine.model_dir / name).is_file():
                    shutil.copy2(engine.model_dir / name, staging / name)
    except OSError as exc:
        raise BadCheckpoint(f"could not write {out_dir}: {exc.strerror or exc}") from exc
    return Path(out_dir).expanduser().resolve()
