"""Downloads from a hub-compatible server on 127.0.0.1: full, resumed, corrupt, hostile, refused, offline, racing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from devtools.hub_server import HubServer, HubState
from qwen2cli.errors import DownloadError

REPO = "Qwen/Tiny-Test"
Hub = namedtuple("Hub", "state url env home")


@pytest.fixture()
def hub(tiny_model, tmp_path):
    state = HubState()
    state.add_directory(REPO, tiny_model)
    with HubServer(state) as server:
        home = tmp_path / "home"
        env = {**os.environ, "HF_ENDPOINT": server.url, "QWEN2_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}
        env.pop("HF_HUB_OFFLINE", None)
        yield Hub(state, server.url, env, home)


def qwen2(hub: Hub, *args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwen2cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**hub.env, **(extra_env or {})},
        stdin=subprocess.DEVNULL,
    )


def installed(hub: Hub) -> list[str]:
    models = hub.home / "models"
    return sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) if models.exists() else []


def one_line_error(done: subprocess.CompletedProcess, fragment: str) -> None:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment.lower() in lines[0].lower(), done.stderr


def test_full_download_then_run(hub, tiny_model):
    done = qwen2(hub, "download", REPO)
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    assert (
        path.is_dir() and (path / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    )
    answer = qwen2(hub, "run", REPO, "hi", "--max-tokens", "3", "--temperature", "0")
    assert answer.returncode == 0, answer.stderr
    listing = qwen2(hub, "list", "--json")
    assert REPO in listing.stdout


def test_cut_transfer_resumes_on_next_attempt(hub):
    hub.state.cut_once.add("model.safetensors")
    first = qwen2(hub, "download", REPO)
    one_line_error(first, "run the same command again to resume")
    assert installed(hub) == []
    partial = list((hub.home / "partial").rglob("model.safetensors.part"))
    assert partial and partial[0].stat().st_size > 0
    second = qwen2(hub, "download", REPO)
    assert second.returncode == 0, second.stderr
    ranges = [r for path, r in hub.state.requests if path.endswith("model.safetensors") and r]
    assert ranges and ranges[-1].startswith("bytes=") and ranges[-1] != "bytes=0-"


def test_wrong_checksum_is_refused_and_nothing_installed(hub):
    hub.state.corrupt.add("model.safetensors")
    one_line_error(qwen2(hub, "download", REPO), "sha256")
    assert installed(hub) == []
    assert not list((hub.home / "models").glob(".staging-*"))


@pytest.mark.parametrize("hostile", ["../escape.json", "/etc/evil.json", "a/../../b.safetensors", "..\\win.json"])
def test_hostile_file_names_refuse_the_repository(hub, hostile):
    hub.state.extra_listing[REPO] = [hostile]
    one_line_error(qwen2(hub, "download", REPO), "outside the model directory")
    assert installed(hub) == []
    assert not (hub.home / "escape.json").exists()


def test_not_found_and_unauthorized_are_one_line(hub):
    one_line_error(qwen2(hub, "download", "Qwen/Does-Not-Exist"), "404")
    hub.state.unauthorized.add(REPO)
    one_line_error(qwen2(hub, "download", REPO), "HF_TOKEN")


def test_offline_mode_is_served_from_the_store(hub):
    assert qwen2(hub, "download", REPO).returncode == 0
    offline = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    done = qwen2(hub, "run", REPO, "hi", "--max-tokens", "2", extra_env=offline)
    assert done.returncode == 0, done.stderr
    one_line_error(qwen2(hub, "download", "Qwen/Other", extra_env=offline), "HF_HUB_OFFLINE")


def test_two_concurrent_downloads_end_with_one_good_copy(hub, tiny_model):
    command = [sys.executable, "-m", "qwen2cli", "download", REPO]
    racers = [
        subprocess.Popen(command, env=hub.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [racer.communicate(timeout=300) for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    assert installed(hub) == [REPO.replace("/", "--")]
    path = Path(outputs[0][0].strip())
    assert (path / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()


def test_unknown_alias_suggests_catalogue_names(hub):
    one_line_error(qwen2(hub, "run", "qwen2.5-7b-instruc", "hi"), "did you mean qwen2.5-7b-instruct")


def test_full_disk_is_refused_before_starting(hub, monkeypatch):
    from qwen2cli import registry, store

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("QWEN2_HOME", str(hub.home))
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(store.shutil, "disk_usage", lambda path: Usage(10**9, 10**9, 1000))
    with pytest.raises(store.StoreFull, match="not enough disk space"):
        registry.resolve_model(REPO)
    assert installed(hub) == []


def test_ctrl_c_mid_download_keeps_partial_file_and_installs_nothing(hub, monkeypatch):
    from qwen2cli import registry

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("QWEN2_HOME", str(hub.home))

    def interrupt(what, done, total):
        if what == "model.safetensors" and done > 0:
            raise KeyboardInterrupt

    hub.state.cut_once.add("model.safetensors")  # leaves part of the file behind first
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        registry.resolve_model(REPO)
    with pytest.raises(KeyboardInterrupt):
        registry.resolve_model(REPO, progress=interrupt)
    assert installed(hub) == []
    assert not list((hub.home / "models").glob(".staging-*"))
    assert list((hub.home / "partial").rglob("model.safetensors.part"))
    assert registry.resolve_model(REPO).is_dir()  # and the next attempt finishes the job
