"""`fluxshard edge`: the whole edge–cloud system with one command on loopback — an embedded server that is gone
after exit, the edge/cloud policies, an emulated link on the real path, per-frame JSONL, fallback to the edge
when the server cannot be reached, damaged input summarised before the error, and clear option errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fluxshard.cli.edge import EmbeddedServer, jpeg_bytes
from fluxshard.errors import FluxShardError
from synth import make_clip

SMALL = ("cup", "--factor", "4", "--max-frames", "5")  # 480×640 → 128×160 engine input, as the edgecloud tests


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fluxshard", "edge", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def summary(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def gone(pid: int) -> bool:
    """No such process, or only a zombie nobody reaped yet (it holds no resources)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.slow  # ~8 s: two processes each load torch and the model
def test_cloud_policy_with_embedded_server_then_server_is_gone(tmp_path: Path) -> None:
    rows = tmp_path / "frames.jsonl"
    s = summary(run_cli(*SMALL, "--policy", "cloud", "--json", "--jsonl", str(rows)))
    assert s["frames"] == 5 and s["lost_frames"] == 0 and s["frames_cloud"] == 5 and s["frames_fallback"] == 0
    assert s["server"] == "embedded" and s["error"] is None and s["link"] is None
    assert s["uplink_bytes_total"] > 0 and s["full_offload_jpeg_bytes_per_frame_median"] > 0
    assert isinstance(s["server_pid"], int) and gone(s["server_pid"])
    lines = rows.read_text().splitlines()
    assert len(lines) == 5
    row = json.loads(lines[0])
    assert row["endpoint"] == "cloud" and row["keyframe"] and row["bytes_up"] > 0
    assert set(row["measured"]) >= {"encode_ms", "transfer_ms", "queue_ms", "compute_ms", "total_ms"}


def test_edge_policy_sends_nothing_and_starts_no_server() -> None:
    s = summary(run_cli(*SMALL, "--policy", "edge", "--json"))
    assert s["frames"] == s["frames_edge"] == 5 and s["uplink_bytes_total"] == 0
    assert s["server"] is None and s["server_pid"] is None


@pytest.mark.slow
def test_emulated_link_lies_on_the_path() -> None:
    s = summary(run_cli(*SMALL, "--policy", "cloud", "--link", "20", "--rtt", "40", "--verify", "--json"))
    assert s["frames_cloud"] == 5 and s["lost_frames"] == 0
    assert s["latency_ms_median"] >= 40.0  # every cloud frame pays at least one emulated RTT
    link = s["link"]
    assert link["rtt_ms"] == 40.0 and link["mbps_mean"] == pytest.approx(20.0)
    assert link["up_bytes"] >= s["uplink_bytes_total"]  # what the runtime sent went through the emulator
    assert gone(s["server_pid"])
    # --verify: dense inference of the same engine input; exact mode equals it up to summation order
    assert s["max_abs_diff_frames"] == 5 and s["max_abs_diff"] <= 1e-4
    assert s["retention_map50"] is not None or "n/a" in s["retention_note"]


@pytest.mark.slow
def test_sigterm_mid_run_stops_the_embedded_server(tmp_path: Path) -> None:
    rows = tmp_path / "frames.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "fluxshard", "edge", "cup", "--factor", "4", "--policy", "cloud",
                          "--json", "--jsonl", str(rows)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (rows.exists() and rows.read_text().count("\n") >= 2):  # the server is up, frames flow
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.stderr else ""
            time.sleep(0.1)
        children = [int(c) for c in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()]
        assert len(children) == 1  # the embedded server
        p.send_signal(signal.SIGTERM)
        p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0 and gone(children[0])


def test_unreachable_server_falls_back_to_the_edge() -> None:
    r = run_cli(*SMALL, "--server", "127.0.0.1:1", "--insecure", "--connect-timeout", "2", "--json")
    s = summary(r)
    assert s["frames"] == s["frames_edge"] == s["frames_fallback"] == 5
    assert s["lost_frames"] == 0 and s["frames_cloud"] == 0 and "127.0.0.1:1" in s["cloud_error"]


def test_damaged_clip_is_summarised_then_one_error_line(synth_dir: Path, tmp_path: Path) -> None:
    clip = make_clip(synth_dir / "edge_clip.mkv", frames=40)
    cut = tmp_path / "cut.mkv"
    data = clip.path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    r = run_cli(str(cut), "--policy", "edge", "--json")
    assert r.returncode == 1
    s = json.loads(r.stdout)
    assert 0 < s["frames"] < 40 and s["lost_frames"] == 0 and "truncated" in s["error"]
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == [f"error: {s['error']}"]


@pytest.mark.parametrize(("args", "expect"), [
    (("--server", "127.0.0.1:1"), "--tls-ca"),
    (("--server", "nocolon", "--insecure"), "HOST:PORT"),
    (("--insecure",), "--server only"),
    (("--payload", "zip"), "residual or bitstream"),
    (("--mode", "turbo"), "exact or fast"),
])
def test_bad_options_get_one_clear_error(args: tuple[str, ...], expect: str) -> None:
    r = run_cli("cup", *args)
    assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr


def test_help() -> None:
    r = run_cli("-h")
    assert r.returncode == 0
    for opt in ("--server", "--policy", "--link", "--rtt", "--edge-slowdown", "--verify", "--jsonl", "--json"):
        assert opt in r.stdout


def test_embedded_server_that_never_listens_is_stopped() -> None:
    srv = EmbeddedServer("nanodet", "exact")
    srv.cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(FluxShardError, match=r"embedded server not listening after 0\.5 s"):
        srv.start(timeout_s=0.5)
    assert srv.pid is not None and gone(srv.pid)


def test_embedded_server_that_exits_says_why() -> None:
    srv = EmbeddedServer("nanodet", "exact")
    srv.cmd = [sys.executable, "-c", "import sys; print('bad model', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(FluxShardError, match=r"exited with code 3: bad model"):
        srv.start(timeout_s=30)


def test_jpeg_of_box_sums_is_the_jpeg_of_their_mean() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    sums = img.astype(np.uint16) * 16  # factor 4: a box of 16 equal pixels
    assert jpeg_bytes(sums, 4) == jpeg_bytes(img, 1) > 0
