"""Persisted executor calibrations: measured once per machine/model/input size, read back by later engines,
so path choices — and with them fast mode's outputs — repeat exactly from run to run."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch

from fluxshard.engine import calibration
from fluxshard.engine.engine import Engine, EngineConfig, EngineError
from test_engine_guard import Net
from test_engine_property import _frames


def _engine(d: Path, **cfg: object) -> Engine:
    cfg = {"mode": "fast", "tau_in": 0.01, "default_threshold": 0.05, "calibrate": True,
           "calibration_dir": str(d), **cfg}
    return Engine(Net().eval(), (48, 64), EngineConfig(**cfg))  # type: ignore[arg-type]


def _run(eng: Engine, frames: list) -> list[torch.Tensor]:
    outs = []
    with torch.inference_mode():
        for x, f in frames:
            outs.append(eng.step(x, f)[0][0].clone())
    return outs


def test_first_engine_stores_later_engines_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    frames = _frames(2, 6, 48, 64, 16, (0, 4), 0.1)
    a = _engine(tmp_path)
    outs_a = _run(a, frames)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and files[0].stem == a.calibration_key()
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o644  # a cache file others may read
    stored = json.loads(files[0].read_text())
    assert set(stored["layers"]) == set(a._calibrated) and stored["pgemm"]

    measured: list[str] = []
    monkeypatch.setattr(Engine, "_calibrate_pgemm", lambda self, name, *a, **k: measured.append(name))
    b = _engine(tmp_path)  # new random weights, same layers: costs depend on shapes, not on weight values
    assert b.calibration_key() == a.calibration_key()
    assert b.calibration() == a.calibration()
    outs_b = _run(b, frames)
    assert measured == []  # read back, not measured
    assert len(outs_b) == len(outs_a)


def test_same_calibration_gives_identical_fast_outputs(tmp_path: Path) -> None:
    """Two engines of one body reading one stored calibration: bit-identical fast-mode outputs."""
    torch.manual_seed(0)
    body = Net().eval()
    frames = _frames(5, 8, 48, 64, 16, (0, 3), 0.2)
    cfg = EngineConfig(mode="fast", tau_in=0.01, default_threshold=0.05, calibrate=True,
                       calibration_dir=str(tmp_path))
    first = _run(Engine(body, (48, 64), cfg), frames)
    for _ in range(2):
        again = _run(Engine(body, (48, 64), cfg), frames)
        assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))


def test_key_changes_with_conditions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = _engine(tmp_path).calibration_key()
    assert _engine(tmp_path, tile=8).calibration_key() != key
    assert Engine(Net().eval(), (64, 64), EngineConfig(calibration_dir=str(tmp_path))).calibration_key() != key
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    assert _engine(tmp_path).calibration_key() != key


@pytest.mark.parametrize("content", ["{not json", '{"version": 999}', "[]", '{"version": 1, "key": "other"}'])
def test_unusable_files_are_measured_anew(tmp_path: Path, content: str) -> None:
    key = _engine(tmp_path).calibration_key()
    (tmp_path / f"{key}.json").write_text(content)
    assert calibration.load(tmp_path, key) is None
    eng = _engine(tmp_path)
    with torch.inference_mode():
        eng.step(torch.rand(1, 3, 48, 64), None)
    assert calibration.load(tmp_path, key) is not None  # measured and stored over the unusable file


def test_malformed_calibration_data_is_named() -> None:
    eng = Engine(Net().eval(), (48, 64), EngineConfig(mode="fast", calibrate=True))
    with pytest.raises(EngineError, match="malformed engine calibration"):
        eng.load_calibration({"plans": [{"sig": [1], "dense": "x", "paths": {}}], "pgemm": {}, "layers": []})


def test_unwritable_directory_costs_nothing_but_time(tmp_path: Path) -> None:
    ro = tmp_path / "file-not-dir"
    ro.write_text("")
    eng = _engine(ro)  # a path under a regular file cannot be created
    with torch.inference_mode():
        eng.step(torch.rand(1, 3, 48, 64), None)
    assert eng._calibrated


def test_run_stores_calibrations_in_the_cache_and_recalibrate_clears_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fluxshard.cli.run import engine_config

    monkeypatch.setenv("FLUXSHARD_CACHE", str(tmp_path))
    cfg = engine_config("nanodet", "fast")
    assert cfg.calibration_dir == str(tmp_path / "calibration") == str(calibration.default_dir())
    assert engine_config("nanodet", "exact", calibrate=False).calibration_dir is None
    d = tmp_path / "calibration"
    d.mkdir()
    (d / "a.json").write_text("{}")
    (d / "b.json").write_text("{}")
    engine_config("nanodet", "fast", recalibrate=True)
    assert not list(d.glob("*.json"))
