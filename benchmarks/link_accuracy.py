"""How faithful the userspace link emulator is on loopback, and what it costs the CPU.

    python benchmarks/link_accuracy.py [--mb 2] [--repeats 3] [--rates 25,56,130] [--delays 0,10,50]

Throughput: a client sends ``--mb`` MB through ``LinkEmulator(uplink=constant(R))`` to a sink server, which
answers the byte count after the client half-closes; achieved = bytes × 8 / (first send → answer). The
emulator's CPU is its thread's CPU time over the transfer (``thread_cpu_s``), as a share of one core.
Delay: median round trip of a 16-byte message through an echo server with ``one_way_delay_ms=D`` (links at
1000 Mbit/s both ways), minus the median round trip straight to the echo server; configured added = 2·D.
Every figure is the median over ``--repeats``. Client, servers and emulator run in this one process (the edge
starts its emulated link in-process too).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import threading
import time

from fluxshard.edgecloud.link import LinkEmulator
from fluxshard.edgecloud.traces import constant


def _server(mode: str) -> int:
    s = socket.create_server(("127.0.0.1", 0))

    def serve(c: socket.socket) -> None:
        total = 0
        with c, contextlib.suppress(ConnectionResetError):  # stopping an emulator resets what is still open
            while d := c.recv(1 << 16):
                total += len(d)
                if mode == "echo":
                    c.sendall(d)
            if mode == "sink":
                c.sendall(str(total).encode())

    def accept() -> None:
        while True:
            c, _ = s.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return s.getsockname()[1]


def throughput(sink: int, mbps: float, nbytes: int) -> tuple[float, float]:
    """(achieved Mbit/s, emulator CPU as a fraction of one core)."""
    with LinkEmulator(("127.0.0.1", sink), uplink=constant(mbps)) as link:
        data = b"\x5a" * nbytes
        c = socket.create_connection(("127.0.0.1", link.port))
        cpu0, t0 = link.thread_cpu_s(), time.perf_counter()
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        answer = c.recv(64)
        dt = time.perf_counter() - t0
        cpu = link.thread_cpu_s() - cpu0
        c.close()
    assert int(answer) == nbytes
    return nbytes * 8 / dt / 1e6, cpu / dt


def rtt_ms(port: int, n: int = 20) -> float:
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.sendall(b"0123456789abcdef")
        got = b""
        while len(got) < 16:
            got += c.recv(16)
        out.append((time.perf_counter() - t0) * 1000)
    c.close()
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rates", default="25,56,130")
    ap.add_argument("--delays", default="0,10,50")
    a = ap.parse_args()
    sink, echo = _server("sink"), _server("echo")
    nbytes = int(a.mb * 1e6)

    print(f"| configured Mbit/s | achieved Mbit/s (median of {a.repeats}) | error | emulator CPU (share of one core) |")
    print("|---|---|---|---|")
    for r in (float(x) for x in a.rates.split(",")):
        runs = [throughput(sink, r, nbytes) for _ in range(a.repeats)]
        got = statistics.median(x for x, _ in runs)
        cpu = statistics.median(y for _, y in runs)
        print(f"| {r:g} | {got:.2f} | {100 * (got - r) / r:+.1f} % | {100 * cpu:.1f} % |")

    base = statistics.median(rtt_ms(echo) for _ in range(a.repeats))
    print(f"\nround trip straight to the echo server: {base:.3f} ms\n")
    print(f"| one-way delay ms | configured added RTT ms | measured added RTT ms (median of {a.repeats}) | error ms |")
    print("|---|---|---|---|")
    for d in (float(x) for x in a.delays.split(",")):
        rtts = []
        for _ in range(a.repeats):
            with LinkEmulator(("127.0.0.1", echo), uplink=1000.0, downlink=1000.0, one_way_delay_ms=d) as link:
                rtts.append(rtt_ms(link.port))
        added = statistics.median(rtts) - base
        print(f"| {d:g} | {2 * d:g} | {added:.2f} | {added - 2 * d:+.2f} |")


if __name__ == "__main__":
    main()
