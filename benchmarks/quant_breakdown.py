"""Where a quantized checkpoint's perplexity loss comes from: each Linear type (or each layer) of the float model
replaced alone by the checkpoint's dequantized weights, and the log-perplexity that costs.

  python benchmarks/quant_breakdown.py NAME=DIR [NAME=DIR ...] [--by type|layer|both] [--text-chars 40000]

DIRs are GPTQ-format checkpoints of the real model (`qwen2 quantize --method gptq|rtn`): their weights stand in
one for one for the float ones. (AWQ folds its scales into the norms and Linears before it, so an AWQ Linear
cannot be swapped in alone.) The float model is the real model's float32 copy (devtools.real_model.real_hf_dir);
the text is the licence text the tests score (devtools.corpus.documentation_text), windows of 512 tokens. Each row
prints as JSON: {"part", "checkpoint", "dlogppl"}, dlogppl = log ppl with that part quantized - log ppl float.
The parts' sum comes close to the whole's (printed first as part "all"): the losses add up, so a method's rows
against RTN's show which Linears its objective fails to help end to end.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from qwen2cli.load_options import LoadOptions

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def dequantized_weights(directory: Path) -> dict[str, torch.Tensor]:
    """{Linear name: float weight (out, in)} of a GPTQ-format checkpoint, decoded by quant.packing."""
    from safetensors.torch import load_file

    from qwen2cli.quant.packing import dequantize_gptq

    try:
        config = json.loads((directory / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{directory}: not a model directory ({exc})") from None
    if config.get("quant_method") != "gptq":
        raise SystemExit(f"{directory}: not a GPTQ-format checkpoint (quant_method {config.get('quant_method')!r})")
    version = 2 if config.get("checkpoint_format") == "gptq_v2" else 1
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    weights = {}
    for name in tensors:
        if name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            weights[prefix] = dequantize_gptq(
                tensors[name],
                tensors[f"{prefix}.qzeros"],
                tensors[f"{prefix}.scales"],
                tensors[f"{prefix}.g_idx"],
                bits=config["bits"],
                version=version,
            )
    return weights


def linear_weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The weight of the model's Linear called `name` (a float model's: nn.Linear)."""
    from torch import nn

    linear = model.get_submodule(name)
    assert isinstance(linear, nn.Linear), f"{name} is a {type(linear).__name__}, not a Linear"
    return linear.weight


def named_checkpoints(items: list[str]) -> list[tuple[str, Path]]:
    """NAME=DIR arguments -> [(NAME, DIR)]; anything else is a one-line error."""
    pairs = []
    for item in items:
        name, sep, directory = item.partition("=")
        if not sep:
            raise SystemExit(f"expected NAME=DIR, got {item!r}")
        pairs.append((name, Path(directory)))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", metavar="NAME=DIR")
    parser.add_argument("--by", choices=("type", "layer", "both"), default="type")
    parser.add_argument("--text-chars", type=int, default=40_000)
    args = parser.parse_args()

    import torch

    from devtools.corpus import documentation_text
    from devtools.real_model import real_hf_dir
    from qwen2cli.generate import load_engine
    from qwen2cli.perplexity import perplexity

    torch.set_num_threads(2)
    checkpoints = {name: dequantized_weights(directory) for name, directory in named_checkpoints(args.checkpoints)}
    engine = load_engine(real_hf_dir(), LoadOptions(device="cpu", dtype="float32"))
    model = engine.loaded.model
    text = documentation_text(args.text_chars)
    linears = list(next(iter(checkpoints.values())))
    original = {name: linear_weight(model, name).detach().clone() for name in linears}

    def log_ppl() -> float:
        return math.log(perplexity(engine, text, ctx=512).ppl)

    base = log_ppl()
    parts = {"all": linears}
    if args.by in ("type", "both"):
        parts.update({kind: [n for n in linears if n.endswith(f".{kind}")] for kind in TYPES})
    if args.by in ("layer", "both"):
        for index in range(len(model.model.layers)):
            parts[f"layer {index}"] = [n for n in linears if n.startswith(f"model.layers.{index}.")]
    print(json.dumps({"float_logppl": round(base, 5)}), flush=True)
    with torch.inference_mode():
        for part, names in parts.items():
            if not names:
                continue
            for checkpoint, weights in checkpoints.items():
                for name in names:
                    linear_weight(model, name).copy_(weights[name])
                cost = log_ppl() - base
                for name in names:
                    linear_weight(model, name).copy_(original[name])
                print(json.dumps({"part": part, "checkpoint": checkpoint, "dlogppl": round(cost, 5)}), flush=True)


if __name__ == "__main__":
    main()
