"""Atomic file writes that leave ordinary permissions.

Why: ``tempfile.mkstemp`` creates its file with mode 0600 (private by design), and renaming it into place
keeps that mode, so cached clips, PTZ metadata and profiles came out readable by their owner only. A file
the user keeps gets what ``open(path, "w")`` would give it: 0666 minus the process umask.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_root() -> Path:
    """``$FLUXSHARD_CACHE``, defaulting like ``scripts/_env.sh`` (``$XDG_CACHE_HOME/fluxshard``, else
    ``~/.cache/fluxshard``) so shell scripts and every Python cache (clips, calibrations, tiling profiles)
    agree."""
    root = os.environ.get("FLUXSHARD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache"), "fluxshard")
    return Path(root).expanduser()


def umask() -> int:
    """The process umask (reading it means setting it: restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(tmp: str | Path, final: str | Path) -> None:
    """Give the temporary file ``tmp`` the mode a plainly created file would have, then rename it to
    ``final`` (atomic on one file system: readers see the old file or the whole new one)."""
    os.chmod(tmp, 0o666 & ~umask())
    os.replace(tmp, final)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it (a crash never leaves half a file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".part", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        publish(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
