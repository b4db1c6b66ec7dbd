"""The CPU policy (fluxshard.cpu): environment handling, user choices winning, and the governor's thread count
from injected /proc/stat readings (no timing: a fake clock and a fake reader)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fluxshard import cpu
from fluxshard.cpu import CpuPolicyError, CpuSample, Policy, ThreadGovernor

PROC_STAT = """cpu  900 10 200 5000 30 0 5 0 0 0
cpu0 400 5 100 2500 15 0 3 0 0 0
cpu1 500 5 100 2500 15 0 2 1 0 0
cpu2 7000 0 0 0 0 0 0 0 0 0
intr 12345
ctxt 999
"""


def test_default_is_auto_and_sets_a_short_spin() -> None:
    env: dict[str, str] = {}
    assert cpu.prepare_env(env) == Policy("auto", None, "default")
    assert env == {"GOMP_SPINCOUNT": "3000"}


@pytest.mark.parametrize("user", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}])
def test_user_wait_settings_are_kept(user: dict[str, str]) -> None:
    env = dict(user)
    cpu.prepare_env(env)
    assert env == user


def test_user_thread_count_disables_the_governor() -> None:
    env = {"OMP_NUM_THREADS": "2"}
    assert cpu.prepare_env(env).mode == "fixed"
    assert env["GOMP_SPINCOUNT"] == "3000"  # the short spin still helps a fixed count on a shared CPU


def test_fluxshard_threads_values() -> None:
    assert cpu.policy_from_env({"FLUXSHARD_THREADS": "3"}) == Policy("fixed", 3, "FLUXSHARD_THREADS=3")
    assert cpu.policy_from_env({"FLUXSHARD_THREADS": " Auto "}).mode == "auto"
    # an explicit count wins over OMP_NUM_THREADS (torch.set_num_threads overrides it)
    assert cpu.policy_from_env({"FLUXSHARD_THREADS": "1", "OMP_NUM_THREADS": "2"}).threads == 1
    env = {"FLUXSHARD_THREADS": "off"}
    assert cpu.prepare_env(env).mode == "off"
    assert env == {"FLUXSHARD_THREADS": "off"}  # off: the package leaves libgomp's defaults alone


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5"])
def test_bad_fluxshard_threads_is_one_clear_error(bad: str) -> None:
    with pytest.raises(CpuPolicyError, match=r"FLUXSHARD_THREADS=.*expected auto, off or a thread count >= 1"):
        cpu.policy_from_env({"FLUXSHARD_THREADS": bad})


def test_parse_proc_stat_sums_busy_fields_of_the_watched_cpus() -> None:
    # cpu0: user 400 + nice 5 + system 100 + irq 0 + softirq 3 + steal 0 (idle, iowait excluded)
    assert cpu.parse_proc_stat(PROC_STAT, [0], 100) == pytest.approx(5.08)
    assert cpu.parse_proc_stat(PROC_STAT, [0, 1], 100) == pytest.approx(5.08 + 6.08)
    assert cpu.parse_proc_stat(PROC_STAT, [5], 100) == 0.0  # a CPU not listed counts nothing


def test_others_cores_is_busy_time_minus_own_time() -> None:
    a, b = CpuSample(0.0, 10.0, 1.0), CpuSample(2.0, 13.0, 2.0)
    assert cpu.others_cores(a, b) == pytest.approx(1.0)  # 3 busy core-seconds, 1 ours, over 2 s
    assert cpu.others_cores(a, a) is None
    assert cpu.others_cores(a, CpuSample(1.0, 10.0, 1.5)) == 0.0  # own > busy (tick rounding): clipped at 0


@pytest.mark.parametrize(("others", "current", "expected"), [
    (1.0, 2, 1),    # one busy competitor on 2 cores: one thread
    (0.4, 2, 2),    # a light one: keep both
    (0.55, 2, 1),   # past DROP: give the core up
    (0.4, 1, 1),    # hysteresis: not free enough yet to take it back
    (0.1, 1, 2),    # competitor gone: both again
    (2.0, 2, 1),    # never below one thread
    (0.0, 2, 2),
])
def test_threads_for_two_cores(others: float, current: int, expected: int) -> None:
    assert cpu.threads_for(others, 2, current, 2) == expected


def test_threads_for_caps_at_max_threads() -> None:
    assert cpu.threads_for(0.0, 8, 2, 4) == 4
    assert cpu.threads_for(3.0, 8, 4, 4) == 4  # 5 cores free, only 4 wanted
    assert cpu.threads_for(5.6, 8, 4, 4) == 2


class _Fake:
    """A scripted machine: readings in order, a settable clock, a thread count."""

    def __init__(self, readings: list[CpuSample | None]) -> None:
        self.readings = readings
        self.now = 0.0
        self.threads = 2
        self.sets: list[int] = []

    def read(self) -> CpuSample | None:
        return self.readings.pop(0)

    def set(self, k: int) -> None:
        self.threads = k
        self.sets.append(k)

    def governor(self) -> ThreadGovernor:
        return ThreadGovernor(2, [0, 1], self.read, self.set, lambda: self.threads, interval=0.5,
                              clock=lambda: self.now)


def test_governor_follows_a_competitor_and_its_exit() -> None:
    f = _Fake([
        CpuSample(0.0, 0.0, 0.0),
        CpuSample(1.0, 2.0, 1.0),   # others took 1 core: drop to 1 thread
        CpuSample(2.0, 4.0, 2.0),   # still there: stay (no set call)
        CpuSample(3.0, 5.0, 3.0),   # only our own thread was busy: back to 2
    ])
    g = f.governor()
    f.now = 0.3
    assert g.tick() is None and len(f.readings) == 3  # before the interval: no /proc read at all
    f.now = 1.0
    assert g.tick() == 1
    assert g.others == pytest.approx(1.0)
    f.now = 2.0
    assert g.tick() is None
    f.now = 3.0
    assert g.tick() == 2
    assert f.sets == [1, 2] and g.changes == 2


def test_governor_waits_for_a_long_enough_window_and_survives_no_proc() -> None:
    f = _Fake([CpuSample(0.0, 0.0, 0.0), CpuSample(0.05, 0.1, 0.0), CpuSample(1.0, 2.0, 1.0)])
    g = f.governor()
    assert g.tick(force=True) is None  # 50 ms of 10 ms ticks is noise: no decision, window keeps its start
    f.now = 1.0
    assert g.tick() == 1  # decided over 0..1 s
    f2 = _Fake([None, None, None])
    g2 = f2.governor()
    f2.now = 5.0
    assert g2.tick() is None and f2.sets == []  # no /proc/stat (not Linux): hold still


def test_tick_is_a_no_op_until_configured_and_applies_a_fixed_count() -> None:
    before = torch.get_num_threads()
    cpu.reset()
    try:
        cpu.tick()
        assert cpu.policy() is None and torch.get_num_threads() == before
        cpu.configure({"FLUXSHARD_THREADS": "1"})
        cpu.tick()
        assert torch.get_num_threads() == 1
        torch.set_num_threads(before)
        cpu.tick()  # applied once: a later explicit set_num_threads is not fought
        assert torch.get_num_threads() == before
    finally:
        cpu.reset()
        torch.set_num_threads(before)


def _cli(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "FLUXSHARD_THREADS")}
    return subprocess.run([sys.executable, "-c", code], env={**e, **env}, capture_output=True, text=True,
                          timeout=60)


def test_cli_sets_the_spin_before_torch_loads() -> None:
    # main() configures first; nothing on the way there (the CLI package, the command modules) may import torch
    r = _cli("import os, sys\nsys.argv = ['fluxshard', '--help']\nfrom fluxshard.cli import main\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False 3000"


def test_cli_rejects_a_bad_fluxshard_threads() -> None:
    r = _cli("import sys; sys.argv = ['fluxshard', '--help']; from fluxshard.cli import main; main()",
             FLUXSHARD_THREADS="many")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: FLUXSHARD_THREADS='many': expected auto, off or a thread count >= 1"


def test_frame_loops_tick_once_per_frame(clip_p: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the governor only acts where it is ticked: from the inference thread, once per frame (detect and run)
    from fluxshard.cli.detect import detect
    from fluxshard.engine.run import run_clip

    calls: list[int] = []
    monkeypatch.setattr(cpu, "tick", lambda: calls.append(1))
    s = run_clip(str(clip_p.path), "nanodet", max_frames=3)
    assert s.frames == 3 and len(calls) == 3
    calls.clear()
    detect(str(clip_p.path), max_frames=4, as_json=True, jsonl=tmp_path / "d.jsonl")
    assert len(calls) == 4
