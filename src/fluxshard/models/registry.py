"""Model registry: adapters are selected by name (``nanodet``) or by a weights path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from fluxshard.errors import FluxShardError
from fluxshard.models.base import ModelAdapter

DEFAULT_MODEL = "nanodet"

_FACTORIES: dict[str, Callable[..., ModelAdapter]] = {}
_SUFFIX_LOADERS: dict[str, Callable[[Path], ModelAdapter]] = {}
_NAME_SUFFIXES: set[str] = set()  # suffixes whose loader also resolves bare names (``yolo11n.yaml``)


class ModelError(FluxShardError):
    """A model name is unknown or its weights cannot be read."""


def register(name: str) -> Callable[[Callable[..., ModelAdapter]], Callable[..., ModelAdapter]]:
    """Class/factory decorator: ``@register("nanodet")``. The factory accepts ``weights=None|path``."""

    def deco(factory: Callable[..., ModelAdapter]) -> Callable[..., ModelAdapter]:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"model {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return deco


def register_suffix(suffix: str, loader: Callable[[Path], ModelAdapter], accepts_names: bool = False) -> None:
    """Let ``load_model(path)`` open weights files ending in ``suffix`` (e.g. ``.pt``) with ``loader``.

    With ``accepts_names`` a bare file name that does not exist (e.g. ``yolo11n.yaml``, a config bundled with
    a library) is passed to ``loader`` too, which must raise :class:`ModelError` if it cannot resolve it.
    """
    _SUFFIX_LOADERS[suffix.lower()] = loader
    if accepts_names:
        _NAME_SUFFIXES.add(suffix.lower())


def available_models() -> list[str]:
    return sorted(_FACTORIES)


def _available_line() -> str:
    names = available_models()
    extra = f"; or a weights path ({', '.join(sorted({'.npz', *_SUFFIX_LOADERS}))})"
    return "available: " + ", ".join(names) + extra


def load_model(name_or_path: str | Path | None = None) -> ModelAdapter:
    """Build an adapter by registered name, or from a weights file.

    A ``.npz`` written by ``tools/tfjs_convert.py`` names its architecture in its ``__model__`` entry.
    """
    key = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    if key in _FACTORIES:
        return _FACTORIES[key]()
    path = Path(key).expanduser()
    looks_like_path = path.suffix != "" or "/" in key or "\\" in key
    if not looks_like_path:
        raise ModelError(f"unknown model {key!r}; {_available_line()}")
    suffix = path.suffix.lower()
    if not path.is_file() and suffix in _NAME_SUFFIXES and path.name == key:
        return _SUFFIX_LOADERS[suffix](path)
    if not path.is_file():
        raise ModelError(f"{path}: no such weights file; {_available_line()}")
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                arch = str(z["__model__"])
        except Exception as exc:  # zip/format errors, missing key
            raise ModelError(f"{path}: unreadable weights ({type(exc).__name__}: {exc}); "
                             f"{_available_line()}") from None
        if arch not in _FACTORIES:
            raise ModelError(f"{path}: weights are for unknown architecture {arch!r}; {_available_line()}")
        try:
            return _FACTORIES[arch](weights=path)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"{path}: weights do not fit {arch} ({exc}); {_available_line()}") from None
    if suffix in _SUFFIX_LOADERS:
        return _SUFFIX_LOADERS[suffix](path)
    raise ModelError(f"{path}: unsupported weights format {suffix!r}; {_available_line()}")
