"""Quantize a checkpoint layer by layer (GPTQ, AWQ or RTN) into the standard GPTQ or AWQ checkpoint format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import BadCheckpoint
from ..generate import Engine
from ..progress import Progress, Step
from .awq_layer import awq_layer
from .calibration import calibration_batches, default_calibration_text
from .gptq_layer import gptq_layer
from .layers import linears_to_quantize, replace_modules, run_layer
from .settings import QuantizeSettings

COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
    "LICENSE",
)


def quantize_model(
    engine: Engine,
    out_dir: Path,
    *,
    settings: QuantizeSettings,
    replace_output: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Quantize every decoder Linear as `settings` say (checked against the model by settings.check_model), each
    layer fed by the already-quantized layers before it; save to `out_dir` (`replace_output`: a model already
    there is replaced). `progress` hears of calibrating (samples), quantizing (layers) and saving (bytes)."""
    from ..quant.convert import quantize_linear

    def report(step: Step, done: int, total: int) -> None:
        if progress is not None:
            progress(step, done, total)

    method, quant_config = settings.method, settings.quant_config
    model = engine.loaded.model
    config = engine.config
    layers = model.model.layers
    with torch.inference_mode():
        hidden = rope = None
        if method in ("gptq", "awq"):
            calibrating = Step("calibration samples", "samples")
            report(calibrating, 0, settings.samples)
            text = settings.calibration or default_calibration_text()
            batches = calibration_batches(engine.tokenizer, text, samples=settings.samples, seq_len=settings.seq_len)
            hidden = model.model.embed_tokens(batches.to(engine.loaded.device)).float()
            rope = model._rope_tables(0, settings.seq_len, hidden.device)
            report(calibrating, len(batches), len(batches))
        quantizing = Step(f"quantizing ({settings.label})", "layers")
        report(quantizing, 0, len(layers))
        for index, layer in enumerate(layers):
            layer.float()  # layers wait in the checkpoint's dtype (views of its files): one float32 layer at a time
            if hidden is not None:
                if method == "gptq":
                    packed = gptq_layer(layer, hidden, rope, config, quant_config)  # float stand-ins left in place
                else:
                    packed, simulated = awq_layer(layer, hidden, rope, config, quant_config, clip=settings.clip)
                    replace_modules(layer, simulated)
                hidden = run_layer(layer, hidden, rope, config)  # the next layer sees quantized outputs
            else:
                packed = {
                    name: quantize_linear(linear, quant_config) for name, linear in linears_to_quantize(layer).items()
                }
            replace_modules(layer, packed)
            report(quantizing, index + 1, len(layers))
    return save_quantized(engine, out_dir, quant_config, replace=replace_output, progress=progress)


def save_quantized(
    engine: Engine, out_dir: Path, quant_config, *, replace: bool = False, progress: Progress | None = None
) -> Path:
    """A complete model directory: config.json with quantization_config, quantize_config.json, safetensors, tokenizer.
    Written beside `out_dir` and renamed into place; `replace`: a model already there is replaced (output_dir.py)."""
    from ..output_dir import written_in_place
    from ..weights import save_weights

    try:
        with written_in_place(out_dir, replace=replace) as staging:
            state = engine.loaded.model.state_dict()  # the tensors themselves: each is made float16 as it is written
            if engine.config.tie_word_embeddings:
                state.pop("lm_head.weight", None)
            save_weights(
                state,
                staging / "model.safetensors",
                float_dtype=torch.float16,
                progress=None if progress is None else lambda done, total: progress(Step("saving"), done, total),
            )
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
