"""Persisted executor calibrations: one measurement per machine, model and input size, reused by every run.

The engine picks each layer's executor path (compiled per-position GEMM, tile-sparse layouts, or the stock
dense convolution) from costs it times on its first frame. Those timings vary 2–3× between runs on a shared
machine, and the paths round differently: in fast mode a truncation test that flips on 1e-6 changes what
later frames recompute, so two identical runs could give different outputs. A calibration stored on disk
the first time and read back afterwards makes the path choices, and with them fast mode's outputs, the same
in every run on this machine (and saves the ~2 s of measuring). The key covers everything a timing depends
on: CPU model and the kernels torch dispatches to, torch version, thread count, the model's convolutions,
input size and executor settings. ``fluxshard run --recalibrate`` (or deleting the file) measures again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

VERSION = 1


def cpu_name() -> str:
    """The CPU model as the kernel reports it (``platform.processor()`` is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> dict[str, Any]:
    """What a layer's timing depends on besides the layer: CPU, dispatched kernels, torch, threads."""
    return {"cpu": cpu_name(), "isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "onednn_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}


def key_of(parts: dict[str, Any]) -> str:
    """A stable file name for a calibration whose conditions are ``parts`` (JSON-able)."""
    blob = json.dumps({"version": VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load(directory: str | Path, key: str) -> dict[str, Any] | None:
    """The stored calibration for ``key``, or None (absent, unreadable or of another version: measure anew)."""
    path = Path(directory) / f"{key}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != VERSION or data.get("key") != key:
        return None
    return data


def save(directory: str | Path, key: str, data: dict[str, Any], conditions: dict[str, Any]) -> Path:
    """Write atomically (a concurrent reader sees the old file or the new one, never half of one), readable
    by others like any cache file."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{key}.json"
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{key}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({"version": VERSION, "key": key, "conditions": conditions, **data}, fh, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def jsonable(v: Any) -> Any:
    """Tuples (cost-model signatures) → lists, recursively."""
    if isinstance(v, tuple | list):
        return [jsonable(x) for x in v]
    return v


def tuplify(v: Any) -> Any:
    """Lists → tuples, recursively: the inverse of :func:`jsonable` for signatures."""
    if isinstance(v, list):
        return tuple(tuplify(x) for x in v)
    return v


def default_dir() -> Path:
    """``$FLUXSHARD_CACHE/calibration`` (defaulting like ``scripts/_env.sh``): where the CLI keeps them."""
    root = os.environ.get("FLUXSHARD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache"), "fluxshard")
    return Path(root).expanduser() / "calibration"


def clear(directory: str | Path) -> int:
    """Delete every stored calibration in ``directory`` (``--recalibrate``); returns how many."""
    n = 0
    for p in Path(directory).glob("*.json"):
        p.unlink(missing_ok=True)
        n += 1
    return n
