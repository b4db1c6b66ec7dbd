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
from pathlib import Path
from typing import Any

import torch

from fluxshard.cpu import cpu_name
from fluxshard.files import cache_root, write_text_atomic

VERSION = 1


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
    blob = json.dumps({"version": VERSION, "key": key, "conditions": conditions, **data}, indent=1)
    return write_text_atomic(Path(directory) / f"{key}.json", blob)


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
    """``$FLUXSHARD_CACHE/calibration``: where the CLI keeps them."""
    return cache_root() / "calibration"


def clear(directory: str | Path) -> int:
    """Delete every stored calibration in ``directory`` (``--recalibrate``); returns how many."""
    n = 0
    for p in Path(directory).glob("*.json"):
        p.unlink(missing_ok=True)
        n += 1
    return n
