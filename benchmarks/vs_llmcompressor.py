"""Our int4 RTN, GPTQ and AWQ against llm-compressor's (vLLM's quantization library): same model, calibration
windows and scored text, in one run. Is a quality gap ours, or the model's?

  python benchmarks/vs_llmcompressor.py [--methods rtn,gptq,awq] [--samples 128] [--seq-len 512] [--text FILE ...]

The first run installs llm-compressor (and the transformers release it pins) into a virtual environment of its own
under ~/.cache/qwen2cli-dev/llmcompressor-venv; it shares this environment's torch (about a minute, from PyPI).

Both sides quantize the real model's float32 copy to int4, asymmetric, group 128, every decoder Linear (embeddings
and head stay float). GPTQ: act-order with static groups (each group contiguous, its range fixed from the original
weights before any update; llm-compressor's default "static"), damping 0.01; ours adds its default Hessian
shrinkage. AWQ: per-channel scales searched on each block's output (llm-compressor's has no clipping search; ours
runs without one by default), then round to nearest. Calibration: the default calibration text, the same
`calibration_batches` windows on both sides. Perplexity: windows of 512 over the licence texts the tests score
(devtools.corpus.documentation_text) and each --text file; ours with qwen2cli.perplexity on the checkpoint `qwen2
quantize` wrote, llm-compressor's with transformers on its fake-quantized model (both give the float model 7.941 on
the licences). "recovery" is the share of the same side's RTN loss a method wins back (1.0: all of it).
llm-compressor's AWQ takes about a minute a layer at 32 x 512 on 2 cores, four at 128 x 512.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from qwen2cli.load_options import LoadOptions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VENV = Path.home() / ".cache" / "qwen2cli-dev" / "llmcompressor-venv"
REQUIREMENTS = ["llmcompressor==0.14.0.1", "transformers==5.17.0"]
METHODS = ("rtn", "gptq", "awq")


def ensure_venv() -> Path:
    import torch

    python = VENV / "bin" / "python"
    marker = VENV / "requirements.txt"
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"  # keep this environment's torch, never a CUDA build
    wanted = "\n".join(REQUIREMENTS + [torch_pin])
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    print(f"installing {', '.join(REQUIREMENTS)} into {VENV}...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--clear", str(VENV)], check=True)
    constraints = VENV / "constraints.txt"
    constraints.write_text(torch_pin + "\n")
    done = subprocess.run(
        [python, "-m", "pip", "install", "-q", "-c", str(constraints), *REQUIREMENTS], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"installing llm-compressor failed: {done.stderr.strip().splitlines()[-1:]}")
    marker.write_text(wanted)
    return python


def texts(files: list[Path]) -> dict[str, str]:
    from devtools.corpus import documentation_text

    out = {"licence": documentation_text(40_000)}
    for path in files:
        try:
            out[path.name] = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise SystemExit(f"--text {path}: {exc.strerror or exc}") from None
    return out


def worker(method: str, samples: int, seq_len: int, files: list[Path]) -> None:
    """Runs in the llm-compressor venv: quantize in memory, score, print one JSON line."""
    import math

    import torch
    import torch.nn.functional as F
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from devtools.real_model import real_hf_dir
    from qwen2cli.quantization.calibration import calibration_batches, default_calibration_text

    source = str(real_hf_dir())
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()

    def score() -> dict[str, float]:
        result = {}
        for name, text in texts(files).items():
            ids = tokenizer(text)["input_ids"]
            nll, scored = 0.0, 0
            with torch.inference_mode():
                for window in (ids[b : b + 512] for b in range(0, len(ids), 512)):
                    if len(window) < 2:
                        continue
                    tokens = torch.tensor([window])
                    logits = model(tokens).logits[0, :-1].float()
                    nll += F.cross_entropy(logits, tokens[0, 1:], reduction="sum").item()
                    scored += len(window) - 1
            result[name] = math.exp(nll / scored)
        return result

    if method == "float":
        print("RESULT " + json.dumps(score()), flush=True)
        return
    import llmcompressor.pipelines.cache as cache
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    cache.IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None  # pins to a device; fails without one

    class Encoder:
        """transformers' tokenizer, read as calibration_batches reads ours."""

        def encode(self, text: str) -> list[int]:
            return tokenizer(text)["input_ids"]

    batches = calibration_batches(Encoder(), default_calibration_text(), samples=samples, seq_len=seq_len)
    data = Dataset.from_dict({"input_ids": batches.tolist(), "attention_mask": torch.ones_like(batches).tolist()})
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 128}
    if method == "gptq":
        weights["actorder"] = "static"
    groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
    recipe = {
        "rtn": [QuantizationModifier(config_groups=groups, ignore=["lm_head"])],
        "gptq": [GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=0.01)],
        "awq": [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])],
    }[method]
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=seq_len, num_calibration_samples=samples)
    print("RESULT " + json.dumps(score()), flush=True)


def reference(python: Path, method: str, args: argparse.Namespace) -> dict[str, float]:
    command = [
        str(python),
        __file__,
        "--worker",
        method,
        "--samples",
        str(args.samples),
        "--seq-len",
        str(args.seq_len),
        *[x for f in args.text for x in ("--text", str(f))],
    ]
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"llm-compressor {method}: {done.stderr.strip()[-1500:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def ours(method: str, work: Path, scored: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    from benchmarks.quality import quantize
    from devtools.real_model import real_hf_dir
    from qwen2cli.generate import load_engine
    from qwen2cli.perplexity import perplexity

    source = real_hf_dir()
    if method != "float":
        out = work / method
        quantize(
            source, out, f"{method}4-g128", argparse.Namespace(samples=args.samples, seq_len=args.seq_len, calib=None)
        )
        source = out
    engine = load_engine(source, LoadOptions(device="cpu", dtype="float32"))
    return {name: perplexity(engine, text, ctx=512).ppl for name, text in scored.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="rtn,gptq,awq")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--text", type=Path, action="append", default=[], help="another text to score (repeatable)")
    parser.add_argument("--worker", choices=("float",) + METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.samples, args.seq_len, args.text)
    methods = args.methods.split(",")
    if unknown := [m for m in methods if m not in METHODS]:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    methods = ["float"] + (["rtn"] if "rtn" not in methods else []) + methods
    scored = texts(args.text)  # a bad --text fails now, not after an hour
    import torch

    torch.set_num_threads(2)
    python = ensure_venv()
    results = {}
    with tempfile.TemporaryDirectory(prefix="vs-llmcompressor-") as work:
        for method in methods:
            results[method] = {
                "ours": ours(method, Path(work), scored, args),
                "llm-compressor": reference(python, method, args),
            }
            print(method, json.dumps(results[method]), file=sys.stderr, flush=True)
    print(
        f"int4 asym g128; calibration {args.samples} x {args.seq_len} (default text); perplexity, recovery of "
        "the same side's RTN loss in brackets"
    )
    names = list(results["float"]["ours"])
    print(f"{'':10}" + "".join(f"{side + ' ' + name:>30}" for name in names for side in ("ours", "llm-compressor")))
    for method in results:
        cells = []
        for name in names:
            for side in ("ours", "llm-compressor"):
                ppl, fp, rtn = (results[m][side][name] for m in (method, "float", "rtn"))
                recovery = f" ({(rtn - ppl) / (rtn - fp):.2f})" if method not in ("float", "rtn") else ""
                cells.append(f"{ppl:.3f}{recovery}")
        print(f"{method:10}" + "".join(f"{cell:>30}" for cell in cells))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
