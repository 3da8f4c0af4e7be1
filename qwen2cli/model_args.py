"""A command's MODEL argument made a local directory: fetched or imported with progress bars on stderr when it must
be, its config.json read before torch loads, and the context the load options ask for told when it rescales RoPE.
For every command module (cli.py, serve_command.py ...); imports no torch."""

from __future__ import annotations

from pathlib import Path

from .config import Qwen2Config, context_notice, load_config
from .load_options import LoadOptions


def local_model(model: str | None) -> Path:
    """MODEL -> a local directory, with progress bars while anything is fetched or imported."""
    from .console import ProgressBars
    from .registry import resolve_model

    with ProgressBars() as bars:
        return resolve_model(model, progress=bars.update, notice=bars.notice)


def local_model_and_config(model: str | None) -> tuple[Path, Qwen2Config]:
    """MODEL -> (directory, its Qwen2Config): a missing model or a missing or foreign config.json is reported
    before torch loads (a second or two later), not after."""
    model_dir = local_model(model)
    return model_dir, load_config(model_dir)


def model_to_load(model: str | None, options: LoadOptions) -> tuple[Path, Qwen2Config]:
    """local_model_and_config, saying on stderr (one line) when the asked-for context rescales RoPE."""
    from .console import dim

    model_dir, config = local_model_and_config(model)
    notice = context_notice(config, options.ctx, attention=options.attention)
    if notice is not None:
        dim(notice)
    return model_dir, config
