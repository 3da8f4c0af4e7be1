"""Quantize a checkpoint layer by layer (GPTQ or RTN) and write it in the standard GPTQ checkpoint format."""
from __future__ import annotations

import inspect
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .errors import BadCheckpoint, BadInput
from .generate import Engine
from .kv_cache import KVCache
from .quantized_load import KEEP_FLOAT

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
                "generation_config.json", "LICENSE")


def default_calibration_text() -> str:
    """Real text every Python install carries: standard-library docstrings (prose) and source (code), plus the
    same prose as ChatML turns. Python Software Foundation License; see README for provenance."""
    import argparse, collections, csv, datetime, email, http.client, json as json_module, logging  # noqa: E401
    import pathlib, subprocess, textwrap, threading, unittest, urllib.request  # noqa: E401

    modules = (argparse, collections, csv, datetime, email, http.client, json_module, logging, pathlib, subprocess,
               textwrap, threading, unittest, urllib.request)
    prose = [inspect.getdoc(m) or "" for m in modules]
    code = [inspect.getsource(m) for m in modules]
    chat = [f"<|im_start|>user\nExplain this module.<|im_end|>\n<|im_start|>assistant\n{p}<|im_end|>\n" for p in prose]
    return "\n\n".join(prose + code + chat)


def calibration_batches(engine: Engine, text: str, *, samples: int, seq_len: int) -> torch.Tensor:
    """(samples, seq_len) token ids cut from the text; too little text is a clear error."""
    ids = engine.tokenizer.encode(text)
    available = len(ids) // seq_len
    if available < min(samples, 8):
        raise BadInput(f"the calibration text is {len(ids)} tokens; at least {min(samples, 8) * seq_len} are needed "
                       f"({min(samples, 8)} samples of --seq-len {seq_len})")
    count = min(samples, available)
    return torch.tensor(ids[: count * seq_len]).reshape(count, seq_len)


def _quantizable(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in layer.named_modules()
            if isinstance(module, nn.Linear) and not name.endswith(KEEP_FLOAT) and not name.endswith("mlp.gate")}


def _run_layer(layer: nn.Module, hidden: torch.Tensor, rope, config, *, batch: int = 8) -> torch.Tensor:
    """One decoder layer over every calibration sample, a few samples at a time."""
    outputs = []
    for begin in range(0, hidden.shape[0], batch):
        piece = hidden[begin:begin + batch]
        cache = KVCache(config, piece.shape[1], batch_size=piece.shape[0], dtype=piece.dtype, device=piece.device)
        outputs.append(layer(piece, rope, cache, 0))
    return torch.cat(outputs)


def quantize_model(engine: Engine, out_dir: Path, *, method: str, bits: int, group_size: int, sym: bool,
                   desc_act: bool, calibration: str | None, samples: int, seq_len: int,
                   progress: Callable[[str, int, int], None] | None = None) -> Path:
    """GPTQ (or RTN) every decoder Linear, each layer fed by the already-quantized layers before it; save."""
    from quant.config import QuantConfig
    from quant.gptq import GPTQ
    from quant.linear import QuantLinear, quantize_linear

    if engine.config.quantization_config is not None:
        raise BadInput("this model is already quantized; quantize the original checkpoint instead")
    try:
        quant_config = QuantConfig(method=method, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act)
    except ValueError as exc:
        raise BadInput(str(exc)) from exc
    if method == "awq":
        raise BadInput("--method awq is not available in this version (use gptq or rtn); AWQ checkpoints load")
    model = engine.loaded.model
    config = engine.config
    for layer in model.model.layers:
        for name, linear in _quantizable(layer).items():
            try:
                quant_config.group_size_for(linear.in_features)
            except ValueError as exc:
                raise BadInput(f"{name}: {exc}") from exc
    with torch.inference_mode():
        hidden = None
        if method == "gptq":
            batches = calibration_batches(engine, calibration or default_calibration_text(), samples=samples,
                                          seq_len=seq_len)
            hidden = model.model.embed_tokens(batches).float()
            rope = model._rope_tables(0, seq_len, hidden.device)
        for index, layer in enumerate(model.model.layers):
            linears = _quantizable(layer)
            replacements: dict[str, nn.Module] = {}
            if method == "gptq":
                collectors = {name: GPTQ(linear.in_features) for name, linear in linears.items()}
                hooks = [linear.register_forward_hook(lambda m, args, out, n=name: collectors[n].add_batch(args[0]))
                         for name, linear in linears.items()]
                try:
                    _run_layer(layer, hidden, rope, config)
                finally:
                    for hook in hooks:
                        hook.remove()
                for name, linear in linears.items():
                    result = collectors[name].quantize(linear.weight, bits=bits, group_size=group_size, sym=sym,
                                                       desc_act=desc_act)
                    replacements[name] = QuantLinear.from_quantized(result.codes, result.scales, result.zeros,
                                                                    result.g_idx, linear.bias, quant_config)
            else:
                replacements = {name: quantize_linear(linear, quant_config) for name, linear in linears.items()}
            for name, replacement in replacements.items():
                parent, _, attribute = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, attribute, replacement)
            if method == "gptq":
                hidden = _run_layer(layer, hidden, rope, config)  # the next layer sees quantized outputs
            if progress is not None:
                progress(f"quantizing ({method} int{bits})", index + 1, len(model.model.layers))
    return save_quantized(engine, out_dir, quant_config)


def save_quantized(engine: Engine, out_dir: Path, quant_config) -> Path:
    """A complete model directory: config.json with quantization_config, quantize_config.json, safetensors, tokenizer."""
    from .checkpoint import save_weights

    out_dir = Path(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        state = {name: (t.to(torch.float16) if t.is_floating_point() else t)
                 for name, t in engine.loaded.model.state_dict().items()}
        if engine.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_weights(state, staging / "model.safetensors")
        raw = json.loads((engine.model_dir / "config.json").read_text())
        raw.update(quantization_config=quant_config.to_hf(), torch_dtype="float16")
        raw.pop("dtype", None)
        (staging / "config.json").write_text(json.dumps(raw, indent=2))
        (staging / "quantize_config.json").write_text(json.dumps(quant_config.to_hf(), indent=2))
        for name in COPIED_FILES:
            if (engine.model_dir / name).is_file():
                shutil.copy2(engine.model_dir / name, staging / name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.replace(out_dir)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise BadCheckpoint(f"could not write {out_dir}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def read_calibration(path: Path) -> str:
    """A calibration file: plain text, or JSONL with a "text" field (or chat "messages") per line."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read calibration file {path}: {exc}") from exc
    if not str(path).endswith(".jsonl"):
        return raw
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            texts.append(item["text"] if "text" in item else
                         "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in item["messages"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise BadInput(f"{path}:{number}: expected a JSON object with \"text\" or \"messages\"") from exc
    return "\n\n".join(texts)
