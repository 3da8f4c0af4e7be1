"""`qwen2 quantize` and `qwen2 perplexity`, the commands that make and score a model (registered on cli.app), and
the loading every command that shows it shares."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import BadInput
from .load_options import LoadOptions
from .model_args import local_model_and_config, model_to_load
from .options import DeviceOpt, DtypeOpt, FloatHeadOpt, JsonOpt, KvCacheOpt, LoadInOpt, ModelArg


def load_shown(model_dir: Path, options: LoadOptions):
    """load_engine with a pulsing "loading NAME" bar on a terminal: torch and the weights take seconds."""
    from .console import ProgressBars
    from .progress import Step

    with ProgressBars() as bars:
        bars.update(Step(f"loading {model_dir.name}", "models"), 0, 0)
        from .generate import load_engine

        return load_engine(model_dir, options)


def _shrink_option(value: str) -> float | None:
    """--shrink: "auto" (None) or a number (its range is QuantizeSettings' to check)."""
    if value == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise BadInput(f"--shrink must be auto or a number in [0, 1], got {value!r}") from None


def quantize(
    model: ModelArg = None,
    method: Annotated[str, typer.Option("--method", help="gptq, awq or rtn.")] = "gptq",
    bits: Annotated[int, typer.Option("--bits", help="4 or 8.")] = 4,
    group_size: Annotated[
        int | None,
        typer.Option("--group-size", help="32, 64, 128, 256 or -1 (per channel). Default: 128 at 4 bits, -1 at 8."),
    ] = None,
    desc_act: Annotated[
        bool | None,
        typer.Option(
            "--desc-act/--no-desc-act",
            help="GPTQ act-order: columns quantized in order of decreasing input energy. Default: on for GPTQ.",
        ),
    ] = None,
    static_groups: Annotated[
        bool | None,
        typer.Option(
            "--static-groups/--no-static-groups",
            help="GPTQ: each group's scale and zero from the weights before any update, groups kept contiguous under "
            "act-order (nothing to reorder at load). Default: on with act-order.",
        ),
    ] = None,
    clip: Annotated[
        bool,
        typer.Option(
            "--clip/--no-clip",
            help="AWQ: also search each group's clipping range on the calibration (AutoAWQ's auto_clip). "
            "Off by default: on Qwen2.5-Coder-0.5B it made perplexity worse (docs/quantization.md).",
        ),
    ] = False,
    sym: Annotated[bool, typer.Option("--sym/--asym", help="Symmetric (default) or asymmetric zero points.")] = True,
    calib: Annotated[str | None, typer.Option("--calib", help="Calibration text or JSONL file.")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Calibration samples.")] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration sample.")] = 512,
    damp: Annotated[
        float,
        typer.Option(
            "--damp",
            help="GPTQ damping, a fraction of the Hessian's mean diagonal; raise it (0.1) for small calibration sets.",
        ),
    ] = 0.01,
    shrink: Annotated[
        str,
        typer.Option(
            "--shrink",
            help="GPTQ: pull the Hessian toward its diagonal, 0 (plain GPTQ) to 1 (round-to-nearest), or auto: "
            "in/(in+tokens), strong when calibration tokens are few.",
        ),
    ] = "auto",
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            help="Output directory (default: the store, as NAME:gptq-int4). It must be new or empty; it is written "
            "beside itself and renamed into place.",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace a model already in --out (a directory of config.json and plain files); anything else "
            "there is never replaced. The old model is deleted only once the new one is in place.",
        ),
    ] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Quantize to int4/int8 in the standard GPTQ or AWQ format (loads in transformers and vLLM); prints the path."""
    from . import store
    from .console import ProgressBars, write_answer
    from .quantization.settings import QuantizeSettings

    settings = QuantizeSettings(
        method=method,
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=desc_act,
        static_groups=static_groups,
        damp=damp,
        shrink=_shrink_option(shrink),
        clip=clip,
        samples=samples,
        seq_len=seq_len,
        calib=Path(calib) if calib else None,
    )
    model_dir, config = local_model_and_config(model)
    if out:  # an output that would lose something is refused before the minutes of work, and checked again at the end
        from .output_dir import check_output_dir

        check_output_dir(out, replace=force, source=model_dir)
    settings.check_model(config)  # before torch and the weights load
    base = model if model and not Path(model).expanduser().exists() else model_dir.name  # alias/repo, else dir name
    name = f"{base.replace('/', '--').split(':')[0]}:{settings.label}"
    from .progress import Step

    with ProgressBars() as bars:
        loading = Step(f"loading {model_dir.name}", "models")
        bars.update(loading, 0, 0)  # no measure of how far: the bar pulses
        # torch loads from here on
        from .generate import load_engine
        from .quantization.pipeline import quantize_model
        from .weights import keep_freed_memory

        keep_freed_memory()
        # in the checkpoint's own dtype, each layer made float32 in its turn: a 7B's weights are 15 GB in bfloat16
        # and would be 30 GB in float32, so a 7B quantizes on a 24 GB machine
        stored = config.torch_dtype if config.torch_dtype in ("bfloat16", "float16") else "float32"
        engine = load_engine(model_dir, LoadOptions(device=device, dtype=stored))
        bars.update(loading, 1, 1)

        def run_quantize(target: Path) -> Path:
            return quantize_model(engine, target, settings=settings, replace_output=force, progress=bars.update)

        if out:
            path = run_quantize(Path(out))
        else:
            with store.install_lock(name), store.staging(name) as staged:
                run_quantize(staged / "model")
                for item in (staged / "model").iterdir():
                    item.replace(staged / item.name)
                (staged / "model").rmdir()
                path = store.commit(
                    name, staged, {"source": "quantize", "base": str(model_dir), "quantization": settings.label}
                ).path
    write_answer(f"{path}\n")


def perplexity_command(
    model: ModelArg = None,
    file: Annotated[str | None, typer.Option("--file", help="Text file to score.")] = None,
    ctx: Annotated[int, typer.Option("--ctx", help="Window length in tokens.")] = 512,
    kv_cache: KvCacheOpt = "float",
    json_output: JsonOpt = False,
    device: DeviceOpt = "auto",
    load_in: LoadInOpt = None,
    float_head: FloatHeadOpt = False,
    dtype: DtypeOpt = "auto",
) -> None:
    """Perplexity of a text file over non-overlapping windows of --ctx tokens."""
    from pathlib import Path

    from .console import print_json

    options = LoadOptions(device=device, dtype=dtype, kv_cache=kv_cache, load_in=load_in, float_head=float_head)
    if file is None:
        raise BadInput("--file is required")
    try:
        text = Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read {file}: {exc}") from exc
    model_dir, _ = model_to_load(model, options)
    engine = load_shown(model_dir, options)  # torch loads here
    from .perplexity import perplexity

    result = perplexity(engine, text, ctx=ctx)
    if json_output:
        print_json({"ppl": result.ppl, "tokens": result.tokens})
    else:
        sys.stdout.write(f"perplexity {result.ppl:.4f} over {result.tokens} tokens in {result.windows} windows\n")


def register(app: typer.Typer) -> None:
    """Add `quantize` and `perplexity` to the `qwen2` app."""
    app.command(name="quantize")(quantize)
    app.command(name="perplexity")(perplexity_command)
