"""Mahimahi traces and the trace-driven link emulator (loopback only, ephemeral ports).

Timing assertions: pacing can only make a transfer slower, so lower bounds on durations (and upper bounds on
bytes delivered) are tight, while the other side is loose enough for a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fluxshard.edgecloud.link import LinkEmulator, LinkError
from fluxshard.edgecloud.traces import (
    PAPER_PROFILES,
    Trace,
    TraceError,
    constant,
    from_spec,
    paper_profile,
    parse,
    step,
    write_paper_traces,
)

# ---- traces ----------------------------------------------------------------------------------------------------


def test_parse_round_trip_and_wrap(tmp_path: Path) -> None:
    f = tmp_path / "t.trace"
    f.write_text("1\n1\n\n3\n4\n")  # two packets at 1 ms, blank line ignored, period 4 ms
    t = parse(f)
    assert t.times_ms.tolist() == [1, 1, 3, 4] and t.period_ms == 4 and len(t) == 4
    assert t.opportunities(0, 4) == 4
    assert t.opportunities(0, 8) == 8  # wraps
    assert t.opportunities(4, 5) == 2  # the second period starts with the two packets at 1 ms
    assert t.count_until(0.5) == 0 and t.count_until(1) == 2 and t.count_until(5) == 6
    assert t.next_opportunity(0) == 1 and t.next_opportunity(1) == 3 and t.next_opportunity(4) == 5
    assert parse(t.write(tmp_path / "again.trace")).times_ms.tolist() == t.times_ms.tolist()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("1\n2\nabc\n", ":3: not a non-negative integer"),
        ("1\n2.5\n", ":2: not a non-negative integer"),
        ("1\n-3\n", ":2: not a non-negative integer"),
        ("5\n7\n6\n", ":3: timestamp 6 is before the previous line's 7"),
        ("", "empty trace file"),
        ("\n\n", "empty trace file"),
        ("0\n0\n", ":2: the last timestamp is 0"),
    ],
)
def test_parse_rejects_malformed(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "bad.trace"
    f.write_text(text)
    with pytest.raises(TraceError, match=r"bad\.trace") as e:
        parse(f)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_parse_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such trace file"):
        parse(tmp_path / "nope.trace")


def test_trace_object_validates() -> None:
    with pytest.raises(TraceError, match="at least one"):
        Trace([])
    with pytest.raises(TraceError, match="before the previous"):
        Trace([3, 2, 5])
    with pytest.raises(TraceError, match="> 0"):
        Trace([0])


@pytest.mark.parametrize("mbps", [12.0, 16.0, 25.0, 56.0, 130.0, 2.0, 0.5, 7.25])
def test_constant_rate_is_exact(mbps: float) -> None:
    t = constant(mbps)
    assert t.mean_mbps == pytest.approx(mbps, rel=1e-9)
    assert t.mbps_between(0, 120_000) == pytest.approx(mbps, rel=1e-3)
    # evenly spread: no millisecond holds more than ceil(rate) packets
    assert np.bincount(t.times_ms).max() <= int(np.ceil(mbps / 12.0))


def test_constant_one_packet_per_ms_is_12_mbps() -> None:
    assert constant(12).times_ms.tolist() == list(range(1, 13))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_constant_rejects_bad_rates(bad: float) -> None:
    with pytest.raises(TraceError, match="positive"):
        constant(bad)


def test_step_trace() -> None:
    t = step(130, 2, at_s=1.0, hold_s=5.0)
    assert t.period_ms == 6000
    assert t.mbps_between(0, 1000) == pytest.approx(130, rel=0.01)
    assert t.mbps_between(1000, 6000) == pytest.approx(2, rel=0.01)
    assert t.mbps_between(6000, 7000) == pytest.approx(130, rel=0.01)  # wraps


@pytest.mark.parametrize("name", list(PAPER_PROFILES))
def test_paper_profiles_statistics(name: str) -> None:
    mean = PAPER_PROFILES[name]
    t = from_spec(name)
    assert t.period_ms == 60_000
    assert t.mean_mbps == pytest.approx(mean, rel=0.01)
    per_s = np.array([t.mbps_between(1000 * i, 1000 * (i + 1)) for i in range(60)])
    assert per_s.std() > 0.05 * mean  # it varies ...
    assert per_s.min() >= 0.59 * mean and per_s.max() <= 1.41 * mean  # ... within the documented bound (±40 %)
    assert t.times_ms.tolist() == paper_profile(mean).times_ms.tolist()  # same seed everywhere


def test_paper_profile_seeds() -> None:
    a, b, c = paper_profile(56, seed=1, duration_s=5), paper_profile(56, seed=1, duration_s=5), paper_profile(56, 2, 5)
    assert a.times_ms.tolist() == b.times_ms.tolist()
    assert a.times_ms.tolist() != c.times_ms.tolist()
    assert c.mean_mbps == pytest.approx(56, rel=0.01)


def test_write_paper_traces(tmp_path: Path) -> None:
    paths = write_paper_traces(tmp_path, duration_s=2.0)
    assert [p.name for p in paths] == ["paper-25.trace", "paper-56.trace", "paper-130.trace"]
    assert parse(paths[2]).mean_mbps == pytest.approx(130, rel=0.01)


def test_from_spec(tmp_path: Path) -> None:
    assert from_spec("25").mean_mbps == pytest.approx(25)
    assert from_spec(" 2.5 ").mean_mbps == pytest.approx(2.5)
    assert from_spec(130).mean_mbps == pytest.approx(130)
    f = constant(3).write(tmp_path / "mine.trace")
    assert from_spec(str(f)).mean_mbps == pytest.approx(3)
    with pytest.raises(TraceError, match="unknown profile 'paper-99'"):
        from_spec("paper-99")
    with pytest.raises(TraceError, match="positive"):
        from_spec("0")
    with pytest.raises(TraceError, match="no such trace file"):
        from_spec(str(tmp_path / "missing.trace"))


# ---- the link --------------------------------------------------------------------------------------------------


class Server:
    """A threaded loopback server: ``echo`` sends back what it reads; ``sink`` records (time, bytes) arrivals
    and answers the total when the client half-closes."""

    def __init__(self, mode: str = "echo") -> None:
        self.mode = mode
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.arrivals: list[tuple[float, int]] = []
        self.resets = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        total = 0
        try:
            while True:
                d = c.recv(65536)
                if not d:
                    break
                total += len(d)
                with self.lock:
                    self.arrivals.append((time.monotonic(), len(d)))
                if self.mode == "echo":
                    c.sendall(d)
            if self.mode == "sink":
                c.sendall(str(total).encode())
        except ConnectionResetError:
            with self.lock:
                self.resets += 1
        finally:
            c.close()

    def received_between(self, t0: float, t1: float) -> int:
        with self.lock:
            return sum(n for t, n in self.arrivals if t0 <= t < t1)


@pytest.fixture
def echo() -> Iterator[Server]:
    s = Server("echo")
    yield s
    s.sock.close()


@pytest.fixture
def sink() -> Iterator[Server]:
    s = Server("sink")
    yield s
    s.sock.close()


def _recv_exact(c: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        d = c.recv(min(65536, n - len(buf)))
        if not d:
            break
        buf += d
    return bytes(buf)


def test_throughput_16_mbps(echo: Server) -> None:
    data = np.random.default_rng(0).integers(0, 256, 2_000_000, dtype=np.uint8).tobytes()
    with LinkEmulator(("127.0.0.1", echo.port), uplink=16.0) as link:
        c = socket.create_connection(("127.0.0.1", link.port))
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(_recv_exact(c, len(data))))
        t0 = time.perf_counter()
        reader.start()
        c.sendall(data)
        reader.join(timeout=10)
        elapsed = time.perf_counter() - t0
        st = link.stats()
        c.close()
    assert got and got[0] == data  # intact, in order
    assert 0.95 <= elapsed <= 3.0  # 2 MB at 16 Mbit/s is 1.0 s
    assert st.up.bytes_in == st.up.bytes_out == len(data) and st.down.bytes_out == len(data)
    assert st.up.queue_delay_ms_mean > 0


def test_one_way_delay_adds_to_round_trip(echo: Server) -> None:
    with LinkEmulator(("127.0.0.1", echo.port), uplink=100.0, downlink=100.0, one_way_delay_ms=50) as link:
        c = socket.create_connection(("127.0.0.1", link.port))
        rtts = []
        for _ in range(3):
            t0 = time.perf_counter()
            c.sendall(b"ping")
            assert _recv_exact(c, 4) == b"ping"
            rtts.append(time.perf_counter() - t0)
        link.set_delay(10)
        t0 = time.perf_counter()
        c.sendall(b"pong")
        assert _recv_exact(c, 4) == b"pong"
        short = time.perf_counter() - t0
        c.close()
    assert min(rtts) >= 0.100 and max(rtts) <= 1.0
    assert 0.020 <= short < min(rtts)


def test_blackhole_stalls_then_flows(echo: Server) -> None:
    with LinkEmulator(("127.0.0.1", echo.port), uplink=50.0) as link:
        c = socket.create_connection(("127.0.0.1", link.port))
        c.sendall(b"before")
        assert _recv_exact(c, 6) == b"before"
        t0 = time.perf_counter()
        link.blackhole(1.0)
        c.sendall(b"during")
        c.settimeout(0.8)
        with pytest.raises(TimeoutError):
            c.recv(10)  # nothing arrives during the blackhole
        c.settimeout(5)
        assert _recv_exact(c, 6) == b"during"  # same connection: it stayed open
        elapsed = time.perf_counter() - t0
        link.blackhole()  # indefinite, until heal()
        c.sendall(b"x")
        c.settimeout(0.3)
        with pytest.raises(TimeoutError):
            c.recv(1)
        link.heal()
        c.settimeout(5)
        assert c.recv(1) == b"x"
        c.close()
    assert 0.99 <= elapsed <= 3.0


def test_reset_reaches_both_ends(echo: Server) -> None:
    with LinkEmulator(("127.0.0.1", echo.port), uplink=50.0) as link:
        c = socket.create_connection(("127.0.0.1", link.port))
        c.sendall(b"hi")
        assert _recv_exact(c, 2) == b"hi"
        link.reset()
        c.settimeout(5)
        with pytest.raises(ConnectionResetError):
            c.recv(10)
        deadline = time.monotonic() + 5
        while echo.resets == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert echo.resets == 1
        assert link.stats().resets == 1
        c2 = socket.create_connection(("127.0.0.1", link.port))  # the link itself still works
        c2.sendall(b"again")
        assert _recv_exact(c2, 5) == b"again"
        c2.close()


def test_unreachable_target_resets_client() -> None:
    s = socket.create_server(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()
    with LinkEmulator(("127.0.0.1", dead_port), uplink=10.0) as link:
        c = socket.create_connection(("127.0.0.1", link.port))
        c.settimeout(5)
        with pytest.raises(ConnectionResetError):
            c.recv(10)


def _send_in_thread(c: socket.socket, n: int) -> threading.Thread:
    def run() -> None:
        with contextlib.suppress(OSError):  # the test resets the link to end the transfer
            c.sendall(b"z" * n)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def test_step_trace_drops_throughput(sink: Server) -> None:
    t_before = time.monotonic()
    with LinkEmulator(("127.0.0.1", sink.port), uplink=step(130, 2, at_s=0.5)) as link:
        c = socket.create_connection(("127.0.0.1", link.port))
        th = _send_in_thread(c, 20_000_000)
        time.sleep(2.0)
        early = sink.received_between(t_before, t_before + 0.5)
        late = sink.received_between(t_before + 1.0, t_before + 2.0)
        link.reset()
        th.join(timeout=5)
        c.close()
    # after the drop: at most 2 Mbit/s for 1 s (+ one 64 KiB read in flight); before: far more
    assert late <= 2e6 / 8 * 1.0 * 1.02 + 65536
    assert early >= 5 * 2e6 / 8 * 0.5 and early / 0.5 >= 5 * late / 1.0


def test_rate_swap_at_run_time(sink: Server) -> None:
    with LinkEmulator(("127.0.0.1", sink.port), uplink=100.0, queue_bytes=64 * 1024) as link:
        c = socket.create_connection(("127.0.0.1", link.port))
        th = _send_in_thread(c, 20_000_000)
        time.sleep(0.3)
        link.rate(1.2)  # 1 packet / 10 ms
        t0 = time.monotonic()
        time.sleep(0.6)
        late = sink.received_between(t0 + 0.1, t0 + 0.6)
        link.reset()
        th.join(timeout=5)
        c.close()
    assert late <= 1.2e6 / 8 * 0.5 * 1.05 + 1500


def test_bounded_queue_under_a_fast_sender(sink: Server) -> None:
    bound = 64 * 1024
    with LinkEmulator(("127.0.0.1", sink.port), uplink=2.0, queue_bytes=bound) as link:
        c = socket.create_connection(("127.0.0.1", link.port))
        th = _send_in_thread(c, 50_000_000)
        peak = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            peak = max(peak, link.queued_bytes("up"))
            time.sleep(0.01)
        st = link.stats()
        link.reset()
        th.join(timeout=5)
        c.close()
    assert peak <= bound and st.up.queued_bytes_max <= bound
    assert st.up.read_paused_s > 0.3  # reads stopped: the sender was held back by TCP, not buffered by us
    assert st.up.bytes_in <= bound + st.up.bytes_out
    assert st.up.bytes_out <= 2e6 / 8 * 1.2 + 1500  # the link ran at its rate meanwhile


def test_loss_is_a_stall_not_corruption(echo: Server) -> None:
    data = bytes(range(256)) * 800  # 200 KiB
    with LinkEmulator(("127.0.0.1", echo.port), uplink=50.0, loss=0.05, loss_stall_ms=5, seed=3) as link:
        c = socket.create_connection(("127.0.0.1", link.port))
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(_recv_exact(c, len(data))))
        reader.start()
        c.sendall(data)
        reader.join(timeout=10)
        st = link.stats()
        c.close()
    assert got and got[0] == data
    assert st.up.losses > 0


def test_async_context_manager(echo: Server) -> None:
    async def main() -> bytes:
        async with LinkEmulator(("127.0.0.1", echo.port), uplink="paper-130", one_way_delay_ms=5) as link:
            r, w = await asyncio.open_connection("127.0.0.1", link.port)
            w.write(b"hello")
            await w.drain()
            got = await asyncio.wait_for(r.readexactly(5), 5)
            link.blackhole(0.05)  # fault calls work from inside the loop too
            w.close()
            return got

    assert asyncio.run(main()) == b"hello"


def test_eof_propagates(sink: Server) -> None:
    with LinkEmulator(("127.0.0.1", sink.port), uplink=20.0, one_way_delay_ms=5) as link:
        c = socket.create_connection(("127.0.0.1", link.port))
        c.sendall(b"a" * 10_000)
        c.shutdown(socket.SHUT_WR)  # half-close travels through the link after the bytes
        c.settimeout(5)
        assert c.recv(100) == b"10000"
        assert c.recv(100) == b""  # then the server's close
        c.close()


def test_bad_arguments() -> None:
    with pytest.raises(LinkError, match="loss"):
        LinkEmulator(("127.0.0.1", 1), uplink=10.0, loss=1.0)
    with pytest.raises(LinkError, match="delay"):
        LinkEmulator(("127.0.0.1", 1), uplink=10.0, one_way_delay_ms=-1)
    with pytest.raises(LinkError, match="queue_bytes"):
        LinkEmulator(("127.0.0.1", 1), uplink=10.0, queue_bytes=100)
    with pytest.raises(TraceError, match="positive"):
        LinkEmulator(("127.0.0.1", 1), uplink="0")
    with pytest.raises(LinkError, match="not running"):
        LinkEmulator(("127.0.0.1", 1), uplink=10.0).blackhole(1)
    with pytest.raises(LinkError, match="direction"):
        LinkEmulator(("127.0.0.1", 1), uplink=10.0).rate(5.0, direction="sideways")  # type: ignore[arg-type]
