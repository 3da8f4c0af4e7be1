"""Which input channels of one Linear type a text uses that the calibration barely does: the mechanism behind
GPTQ losing to round-to-nearest on text unlike its calibration.

  python benchmarks/channel_energy.py [--linear down_proj] [--text licence|calib|FILE] [--samples 32]

GPTQ pushes each column's rounding error onto the columns after it in proportion to how little the calibration
inputs use them, so the channels the calibration leaves quiet absorb the most change. That is harmless while the
text you run leaves them quiet too. This runs the float model (the real model's float32 copy) over the default
calibration windows (`--samples` x 512, as `qwen2 quantize` takes them) and over the text (windows of 512, see
quant_layer_error.py), sums each input channel's squared activation per layer (the attention-sink token, each
window's first, left out), and prints per layer: the share of the text's energy in the channels that carry the
calibration's lowest half (and lowest tenth) of energy, next to the calibration's own share; and the median over
channels of text energy / calibration energy (per token).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwen2cli.load_options import LoadOptions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--linear", default="down_proj")
    parser.add_argument("--text", default="licence")
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()

    import torch

    from benchmarks.quant_layer_error import WINDOW, run_with_input_hooks, windows
    from devtools.real_model import real_hf_dir
    from qwen2cli.generate import load_engine
    from qwen2cli.quantization.calibration import calibration_batches, default_calibration_text

    torch.set_num_threads(2)
    engine = load_engine(real_hf_dir(), LoadOptions(device="cpu", dtype="float32"))
    model = engine.loaded.model
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(f".{args.linear}")
    ]
    if not names:
        raise SystemExit(f"no Linear named *.{args.linear} in the model")

    def energy(batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """{Linear name: mean squared input per channel}, sink tokens left out."""
        sums: dict[str, torch.Tensor] = {}

        def summer(name: str):
            def record(x: torch.Tensor) -> None:
                sums[name] = sums.get(name, 0) + x[:, 1:].float().pow(2).sum((0, 1))

            return record

        run_with_input_hooks(engine, batches, {name: summer(name) for name in names})
        tokens = sum(batch.shape[0] * (batch.shape[1] - 1) for batch in batches)
        return {name: total / tokens for name, total in sums.items()}

    def share(table: torch.Tensor, channels: torch.Tensor) -> float:
        return float(table[channels].sum() / table.sum())

    calibration = calibration_batches(
        engine.tokenizer, default_calibration_text(), samples=args.samples, seq_len=WINDOW
    )
    calibrated = energy(list(calibration.split(4)))
    text = energy([torch.tensor([window]) for window in windows(engine.tokenizer, args.text)])
    print(
        f"{args.linear} inputs, {args.text} against {calibration.shape[0]} x {WINDOW} calibration tokens: share of "
        "energy in the calibration's quietest half / tenth of channels (text, calibration), median energy ratio"
    )
    for name in names:
        quiet = torch.argsort(calibrated[name])
        half, tenth = quiet[: len(quiet) // 2], quiet[: len(quiet) // 10]
        ratio = (text[name] / calibrated[name].clamp(min=1e-12)).median()
        print(
            f"{name}: half {share(text[name], half):.3f} ({share(calibrated[name], half):.3f})  "
            f"tenth {share(text[name], tenth):.4f} ({share(calibrated[name], tenth):.4f})  median ratio {ratio:.2f}"
        )


if __name__ == "__main__":
    main()
