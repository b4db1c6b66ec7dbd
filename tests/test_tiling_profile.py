"""Family profiles: JSON round trip, validation errors naming file and field, plan-runtime estimate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fluxshard.errors import FluxShardError
from fluxshard.tiling.bins import N_BINS
from fluxshard.tiling.profile import (
    FamilyProfile,
    ModelProfile,
    ProfileError,
    load_profile,
    plan_runtime_estimate,
    synthetic_family,
)


def test_synthetic_family_is_monotone() -> None:
    fam = synthetic_family()
    assert fam.names == ["det320", "det416", "det512", "det640"]
    lat = fam.latencies("non-conservative")
    assert np.all(np.diff(lat) > 0) and np.all(fam.latencies("conservative") > lat)
    acc = fam.accuracy_matrix()
    assert acc.shape == (4, N_BINS) and np.all((acc >= 0) & (acc <= 1))
    assert np.all(np.diff(acc, axis=0) >= 0)  # bigger input: never worse in any bin
    assert acc[0, 0] < acc[0, 8] and acc[0, -1] < acc[0, 15]  # tiny and over-large objects are hard


def test_round_trip(tmp_path: Path) -> None:
    fam = synthetic_family().with_plan_runtime([1.0, 2.0, 3.0])
    path = fam.save(tmp_path / "sub" / "fam.json")
    back = load_profile(path)
    assert back.models == fam.models and back.plan_runtime_ms == pytest.approx(fam.plan_runtime_ms)
    assert back.inference_budget(100.0) == pytest.approx(100.0 - fam.plan_runtime_ms)
    assert back.inference_budget(0.0) == 0.0


def test_plan_runtime_is_p99_plus_ten_percent() -> None:
    times = np.arange(1, 101, dtype=float)
    assert plan_runtime_estimate(times) == pytest.approx(np.percentile(times, 99) * 1.1)
    assert plan_runtime_estimate([5.0]) == pytest.approx(5.5)
    with pytest.raises(ValueError):
        plan_runtime_estimate([])


def _mutations() -> list[tuple[str, Any, str]]:
    def set_(path: list[Any], value: Any) -> Any:
        def f(d: dict[str, Any]) -> None:
            cur: Any = d
            for k in path[:-1]:
                cur = cur[k]
            if value is KeyError:
                del cur[path[-1]]
            else:
                cur[path[-1]] = value
        return f

    return [
        ("format", set_(["format"], "other"), "format"),
        ("version", set_(["version"], 99), "version"),
        ("edges", set_(["bin_edges"], [0.1] * 21), "bin_edges"),
        ("models type", set_(["models"], {}), "models"),
        ("empty", set_(["models"], []), "models"),
        ("missing", set_(["models", 1, "p99_ms"], KeyError), "models[1].p99_ms"),
        ("name", set_(["models", 0, "name"], ""), "models[0].name"),
        ("dup", set_(["models", 1, "name"], "det320"), "models[1].name"),
        ("input", set_(["models", 2, "input_size"], 12.5), "models[2].input_size"),
        ("neg", set_(["models", 0, "mean_ms"], -1), "models[0].mean_ms"),
        ("nan", set_(["models", 0, "mean_ms"], "fast"), "models[0].mean_ms"),
        ("p99<mean", set_(["models", 3, "p99_ms"], 1.0), "models[3].p99_ms"),
        ("acc len", set_(["models", 0, "accuracy"], [0.5] * 21), "models[0].accuracy"),
        ("acc range", set_(["models", 0, "accuracy", 5], 1.5), "models[0].accuracy[5]"),
        ("acc type", set_(["models", 0, "accuracy"], "high"), "models[0].accuracy"),
        ("runtime", set_(["plan_runtime_ms"], -2), "plan_runtime_ms"),
    ]


@pytest.mark.parametrize(("label", "mutate", "field"), _mutations(), ids=[m[0] for m in _mutations()])
def test_malformed_profiles_name_file_and_field(tmp_path: Path, label: str, mutate: Any, field: str) -> None:
    raw = synthetic_family().to_json()
    mutate(raw)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert isinstance(err.value, FluxShardError)
    assert str(path) in str(err.value) and field in str(err.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no such profile"):
        load_profile(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ProfileError, match=r"junk\.json"):
        load_profile(tmp_path / "junk.json")


def test_in_memory_validation() -> None:
    with pytest.raises(ProfileError, match="accuracy"):
        FamilyProfile((ModelProfile("m", 320, 1.0, 2.0, (0.5,) * 3),))
    with pytest.raises(ValueError):
        synthetic_family().models[0].latency("fast")
