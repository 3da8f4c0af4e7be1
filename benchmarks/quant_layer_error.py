"""Each layer's output error of one Linear type, checkpoint against checkpoint, on a given text: does a method's
lower error on its calibration carry over to the text you run?

  python benchmarks/quant_layer_error.py BASE=DIR OTHER=DIR [--linear down_proj] [--text licence|calib|FILE]

Both DIRs are GPTQ-format checkpoints of the real model (see quant_breakdown.py). The float model (the real model's
float32 copy) runs the text in windows of 512 tokens; each layer's Linear input is multiplied by the float weight
minus each checkpoint's dequantized weight, and the squared errors are summed per layer, the attention-sink token
(each window's first) apart from the rest. Printed per layer: OTHER's error over BASE's, sink and rest, and the
sink's share of BASE's error. --text: licence (the licence texts the tests score), calib (16 windows of the
default calibration text that calibration_batches does not take at 128 x 512: held out, same distribution), or a
text file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwen2cli.load_options import LoadOptions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WINDOW = 512


def windows(tokenizer, source: str) -> list[list[int]]:
    import torch

    if source == "calib":
        from qwen2cli.quantization.calibration import default_calibration_text

        ids = tokenizer.encode(default_calibration_text())
        available = len(ids) // WINDOW
        taken = set(torch.linspace(0, available - 1, 128).round().long().tolist())  # as calibration_batches
        rest = [i for i in range(available) if i not in taken]
        picked = [rest[int(j)] for j in torch.linspace(0, len(rest) - 1, 16).round().long().tolist()]
        return [ids[i * WINDOW : (i + 1) * WINDOW] for i in picked]
    if source == "licence":
        from devtools.corpus import documentation_text

        text = documentation_text(40_000)
    else:
        try:
            text = Path(source).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise SystemExit(
                f"--text {source}: not licence, calib or a readable file ({exc.strerror or exc})"
            ) from None
    ids = tokenizer.encode(text)
    return [ids[b : b + WINDOW] for b in range(0, len(ids) - WINDOW + 1, WINDOW)]


def run_with_input_hooks(engine, batches, hooks: dict) -> None:
    """The float model over each (B, T) batch of token ids, hooks[name](input) seeing each named Linear's input."""
    import torch

    from qwen2cli.kv_cache import KVCache

    model = engine.loaded.model
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda _, inputs, record=record: record(inputs[0]))
        for name, record in hooks.items()
    ]
    try:
        with torch.inference_mode():
            for batch in batches:
                model(batch, KVCache(engine.config, batch.shape[1], batch_size=batch.shape[0], device="cpu"), 0)
    finally:
        for handle in handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs=2, metavar="NAME=DIR")
    parser.add_argument("--linear", default="down_proj")
    parser.add_argument("--text", default="licence")
    args = parser.parse_args()

    import torch

    from benchmarks.quant_breakdown import dequantized_weights, linear_weight, named_checkpoints
    from devtools.real_model import real_hf_dir
    from qwen2cli.generate import load_engine

    torch.set_num_threads(2)
    named = named_checkpoints(args.checkpoints)
    weights = {name: dequantized_weights(directory) for name, directory in named}
    (base, _), (other, _) = named
    engine = load_engine(real_hf_dir(), LoadOptions(device="cpu", dtype="float32"))
    model = engine.loaded.model
    linears = sorted(
        (name for name in weights[base] if name.endswith(f".{args.linear}")),
        key=lambda name: [int(part) if part.isdigit() else part for part in name.split(".")],
    )
    if not linears:
        raise SystemExit(f"no Linear named *.{args.linear} in the checkpoints")
    errors = {name: {checkpoint: [0.0, 0.0] for checkpoint in weights} for name in linears}
    # float weight minus each checkpoint's, once per Linear rather than once per window
    deltas = {
        name: {
            checkpoint: (linear_weight(model, name).detach().float() - table[name]).t()
            for checkpoint, table in weights.items()
        }
        for name in linears
    }

    def measure(name: str):
        def record(x) -> None:
            for checkpoint, delta in deltas[name].items():
                squared = (x.float() @ delta).pow(2).sum(-1)  # (B, T)
                errors[name][checkpoint][0] += squared[:, 0].sum().item()
                errors[name][checkpoint][1] += squared[:, 1:].sum().item()

        return record

    run_with_input_hooks(
        engine,
        [torch.tensor([window]) for window in windows(engine.tokenizer, args.text)],
        {name: measure(name) for name in linears},
    )
    print(f"{args.linear} on {args.text}: {other} / {base} output error per layer")
    for name in linears:
        (base_sink, base_rest), (other_sink, other_rest) = errors[name][base], errors[name][other]
        print(
            f"{name}: sink {other_sink / max(base_sink, 1e-30):.3f}  rest {other_rest / max(base_rest, 1e-30):.3f}"
            f"  (sink share of {base}'s: {base_sink / max(base_sink + base_rest, 1e-30):.2f})"
        )


if __name__ == "__main__":
    main()
