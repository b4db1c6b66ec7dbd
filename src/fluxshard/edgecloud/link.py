"""A userspace, trace-driven link: an asyncio TCP proxy that paces bytes by a Mahimahi trace and adds delay.

Why userspace: kernel ``netem`` does not exist on these machines and ``tbf`` only shapes a constant rate inside a
network namespace; a trace-driven rate, a one-way delay and faults changed at run time need a program in the path.

Model (per direction, one link shared by every connection through the proxy, as a real link is):

* a FIFO **byte queue** of at most ``queue_bytes`` (plus one read of ≤ 64 KiB per further connection reading
  at the same moment); when it is full the proxy stops reading from the source sockets, so the kernel's TCP
  windows close and the sender blocks (backpressure: memory stays bounded);
* a **pacer** that, at each delivery opportunity of the trace, releases up to 1500 bytes from the head of the
  queue. Opportunities that find the queue empty are lost (as in Mahimahi: an idle link does not bank
  capacity, except that bytes arriving at an idle link may use the last millisecond's, as at Mahimahi's 1 ms
  clock resolution). It wakes on the event loop's timer (1 ms granularity: epoll rounds timeouts up) and
  spends every opportunity that passed since its last wake-up, so the rate is exact over a few milliseconds
  and bursty below that;
* a **delay line** that holds released bytes for ``one_way_delay_ms`` before writing them to the destination.

Faults, settable while running from any thread (Toxiproxy's list, as far as a byte-stream proxy can show it):
``blackhole(s)`` (nothing is delivered, connections stay open), ``reset()`` (RST to both ends of every
connection), ``rate(trace)`` (swap the trace; the new one starts at time 0), ``set_delay(ms)``.

**Packet loss is modelled as stalls.** A TCP proxy sits above the kernel's TCP: its sockets deliver a reliable,
ordered byte stream, so it never sees a lost packet, and dropping bytes would corrupt the stream instead of
emulating loss. What an application observes of a loss is a stall: the bytes behind the lost packet wait for
its retransmission (about one RTT with fast retransmit, ≥ 200 ms on a retransmission timeout). With ``loss=p``
each delivery opportunity that carries bytes is lost with probability ``p``: its bytes stay at the head of the
queue and the direction stalls for ``loss_stall_ms`` (default: one RTT, at least 1 ms). A blackhole likewise
keeps the bytes queued (TCP would retransmit them after the outage) rather than dropping them.

Not modelled: the TCP handshake does not cross the link (the client's ``connect`` completes at the proxy and
the proxy then connects to the target at once); the kernel socket buffers between the sender and the proxy
hold bytes that have not yet entered the link (``socket_buffer_bytes`` keeps the proxy's side of them small).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import random
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from fluxshard.edgecloud.traces import PACKET_BYTES, Trace, from_spec
from fluxshard.errors import FluxShardError

Direction = Literal["up", "down", "both"]

READ_CHUNK = 64 * 1024
"""Largest read from a source socket (also the StreamReader's buffer limit, so at most 2× this waits there)."""

WRITE_HIGH_WATER = 256 * 1024
"""The pacer stops releasing bytes for a connection whose destination has this much unsent: the receiver
is not reading, so a real link would carry nothing for it either."""


IDLE_LOOKBACK_MS = 1.0
"""Bytes arriving at an idle link may use the unused opportunities of the last millisecond (see ``_pace``)."""


class LinkError(FluxShardError):
    """The link emulator could not start, or was used while not running."""


@dataclass(frozen=True)
class DirectionStats:
    """Counters of one direction. ``queue_delay_ms_*`` is the time bytes waited in the queue (byte-weighted
    mean, and maximum); ``read_paused_s`` the total time source reads were paused by a full queue."""

    bytes_in: int
    bytes_out: int
    queued_bytes: int
    queued_bytes_max: int
    queue_delay_ms_mean: float
    queue_delay_ms_max: float
    read_paused_s: float
    losses: int


@dataclass(frozen=True)
class LinkStats:
    up: DirectionStats
    down: DirectionStats
    connections_total: int
    connections_open: int
    resets: int


class _Alarm:
    """A sleep that another task can cut short (a fault or new data must not wait for a long timer)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._fut: asyncio.Future[None] | None = None

    async def wait(self, deadline: float | None) -> None:
        fut = self._loop.create_future()
        self._fut = fut
        h = self._loop.call_at(deadline, _wake, fut) if deadline is not None else None
        try:
            await fut
        finally:
            self._fut = None
            if h is not None:
                h.cancel()

    def poke(self) -> None:
        if self._fut is not None:
            _wake(self._fut)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as Toxiproxy's reset_peer does; a plain close would send FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Conn:
    """One proxied connection: the client side (accepted) and the server side (opened to the target)."""

    def __init__(self, cw: asyncio.StreamWriter, sw: asyncio.StreamWriter) -> None:
        self.writers = {"up": sw, "down": cw}  # where each direction's bytes go
        self.eof_done: set[str] = set()
        self.closed = False
        self.tasks: list[asyncio.Task[None]] = []


class _Way:
    """One direction of the link: queue, pacer state, delay line, counters."""

    def __init__(self, name: str, trace: Trace | None, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.trace = trace
        self.origin = loop.time()
        self.queue: deque[list[Any]] = deque()  # [conn, data | None (EOF), offset, t_enqueued]
        self.queued = 0
        self.space = asyncio.Event()
        self.space.set()
        self.delay_line: deque[tuple[float, _Conn, bytes | None]] = deque()
        self.pacer_alarm = _Alarm(loop)
        self.delivery_alarm = _Alarm(loop)
        self.stall_until = 0.0
        self.spent = 0  # delivery opportunities since origin that are used or lost
        self.bytes_in = 0
        self.bytes_out = 0
        self.queued_max = 0
        self.delay_byte_s = 0.0
        self.delay_max_s = 0.0
        self.read_paused_s = 0.0
        self.losses = 0

    def stats(self) -> DirectionStats:
        released = self.bytes_in - self.queued
        return DirectionStats(
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            queued_bytes=self.queued,
            queued_bytes_max=self.queued_max,
            queue_delay_ms_mean=1000.0 * self.delay_byte_s / released if released > 0 else 0.0,
            queue_delay_ms_max=1000.0 * self.delay_max_s,
            read_paused_s=self.read_paused_s,
            losses=self.losses,
        )


class LinkEmulator:
    """A TCP proxy from ``listen`` to ``target`` that behaves like a link with the given traces and delay.

    ``uplink`` paces client → target bytes, ``downlink`` target → client (``None``: no rate limit, delay only);
    either may be a :class:`Trace`, a number (constant Mbit/s) or a ``TRACE_OR_MBPS`` spec string.
    ``one_way_delay_ms`` applies to each direction (RTT = 2×). Use as ``async with LinkEmulator(...) as link``
    inside an event loop, or ``port = link.start_in_thread()`` … ``link.stop()`` (or ``with``) from sync code.
    """

    def __init__(
        self,
        target: tuple[str, int],
        uplink: Trace | float | str | None,
        downlink: Trace | float | str | None = None,
        one_way_delay_ms: float = 0.0,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        queue_bytes: int = 1 << 20,
        loss: float = 0.0,
        loss_stall_ms: float | None = None,
        seed: int = 0,
        socket_buffer_bytes: int | None = 64 * 1024,
    ) -> None:
        if queue_bytes < PACKET_BYTES:
            raise LinkError(f"queue_bytes must be at least one packet ({PACKET_BYTES}), got {queue_bytes}")
        if not 0.0 <= loss < 1.0:
            raise LinkError(f"loss must be a probability in [0, 1), got {loss}")
        self.target = target
        self.listen = listen
        self.queue_bytes = int(queue_bytes)
        self._traces = {"up": _as_trace(uplink), "down": _as_trace(downlink)}
        self._delay_s = _check_delay(one_way_delay_ms)
        self._loss = loss
        self._loss_stall_ms = loss_stall_ms
        self._rng = random.Random(seed)
        self._sockbuf = socket_buffer_bytes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._ways: dict[str, _Way] = {}
        self._conns: set[_Conn] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._blackhole_until = 0.0
        self._conns_total = 0
        self._resets = 0
        self._thread: threading.Thread | None = None
        self.port = 0

    # ---- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        if self._server is not None:
            raise LinkError("link emulator already started")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._ways = {d: _Way(d, self._traces[d], loop) for d in ("up", "down")}
        sock = socket.socket(socket.AF_INET6 if ":" in self.listen[0] else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._sockbuf:  # set before listen(): accepted sockets inherit it and the window scale fits it
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._sockbuf)
            sock.bind(self.listen)
        except OSError as e:
            sock.close()
            raise LinkError(f"link emulator cannot listen on {self.listen[0]}:{self.listen[1]}: {e}") from None
        self._server = await asyncio.start_server(self._on_client, sock=sock, limit=READ_CHUNK)
        self.port = int(sock.getsockname()[1])
        for w in self._ways.values():
            self._tasks.append(loop.create_task(self._pace(w), name=f"link-pacer-{w.name}"))
            self._tasks.append(loop.create_task(self._deliver_loop(w), name=f"link-delay-{w.name}"))
        return self.port

    async def aclose(self) -> None:
        """Stop listening, reset every connection, stop the pacers."""
        if self._server is None:
            return
        self._server.close()
        for c in list(self._conns):
            self._close_conn(c, rst=True)
        tasks = self._tasks + [t for c in list(self._conns) for t in c.tasks]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)
        self._server = None
        self._tasks.clear()

    async def __aenter__(self) -> LinkEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def start_in_thread(self) -> int:
        """Run the emulator on its own event loop in a daemon thread (for sync code); returns the bound port."""
        started: concurrent.futures.Future[int] = concurrent.futures.Future()

        def run() -> None:
            loop = asyncio.new_event_loop()
            try:
                try:
                    started.set_result(loop.run_until_complete(self.start()))
                except BaseException as e:
                    started.set_exception(e)
                    return
                loop.run_forever()
                loop.run_until_complete(self.aclose())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="fluxshard-link", daemon=True)
        self._thread.start()
        return started.result(timeout=10)

    def stop(self) -> None:
        """Stop an emulator started with :meth:`start_in_thread` (resets the open connections)."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> LinkEmulator:
        self.start_in_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- faults and counters (callable from any thread) ------------------------------------------------------

    def blackhole(self, seconds: float | None = None) -> None:
        """Deliver nothing in either direction for ``seconds`` (``None``: until :meth:`heal`). Connections stay
        open and bytes stay queued (reads stop when the queue fills); they flow again afterwards."""
        if seconds is not None and not seconds >= 0:
            raise LinkError(f"blackhole seconds must be >= 0, got {seconds}")
        self._on_loop(self._set_blackhole, math.inf if seconds is None else float(seconds))

    def heal(self) -> None:
        """End a blackhole now."""
        self._on_loop(self._set_blackhole, 0.0)

    def reset(self) -> None:
        """Reset every open connection: both ends get a TCP RST, queued bytes are dropped. New connections work."""
        self._on_loop(self._reset_all)

    def rate(self, trace: Trace | float | str | None, direction: Direction = "up") -> None:
        """Swap the trace of ``direction`` (``"up"``, ``"down"`` or ``"both"``); the new trace starts at time 0.
        ``None`` removes the rate limit."""
        if direction not in ("up", "down", "both"):
            raise LinkError(f"direction must be 'up', 'down' or 'both', got {direction!r}")
        t = _as_trace(trace)
        self._on_loop(self._set_rate, t, direction)

    def set_delay(self, one_way_delay_ms: float) -> None:
        """Change the one-way delay (bytes already in the delay line keep their time)."""
        d = _check_delay(one_way_delay_ms)
        self._on_loop(setattr, self, "_delay_s", d)

    def stats(self) -> LinkStats:
        """A snapshot of the counters."""
        if not self._ways:
            raise LinkError("link emulator is not running")
        return self._on_loop(self._stats)

    def thread_cpu_s(self) -> float:
        """CPU seconds the emulator's thread has used (only after :meth:`start_in_thread`): what the link costs
        the machine, since it shares the cores with the edge and the server."""
        th = self._thread
        if th is None or th.ident is None:
            raise LinkError("thread_cpu_s needs an emulator started with start_in_thread()")
        return time.clock_gettime(time.pthread_getcpuclockid(th.ident))

    @property
    def one_way_delay_ms(self) -> float:
        return self._delay_s * 1000.0

    def queued_bytes(self, direction: Literal["up", "down"] = "up") -> int:
        """Bytes waiting in ``direction``'s queue now."""
        return self._ways[direction].queued if self._ways else 0

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the emulator's loop: directly from inside it, else through the loop, waiting for it
        (so a fault is in force when the call returns)."""
        loop = self._loop
        if loop is None or self._server is None:
            raise LinkError("link emulator is not running")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return fn(*args)
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def call() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as e:
                done.set_exception(e)

        loop.call_soon_threadsafe(call)
        return done.result(timeout=10)

    def _stats(self) -> LinkStats:
        return LinkStats(
            up=self._ways["up"].stats(),
            down=self._ways["down"].stats(),
            connections_total=self._conns_total,
            connections_open=len(self._conns),
            resets=self._resets,
        )

    def _poke_all(self) -> None:
        for w in self._ways.values():
            w.pacer_alarm.poke()
            w.delivery_alarm.poke()

    def _set_blackhole(self, seconds: float) -> None:
        assert self._loop is not None
        self._blackhole_until = self._loop.time() + seconds if seconds > 0 else 0.0
        self._poke_all()

    def _set_rate(self, trace: Trace | None, direction: Direction) -> None:
        assert self._loop is not None
        for d in ("up", "down") if direction == "both" else (direction,):
            self._traces[d] = trace
            w = self._ways[d]
            w.trace = trace
            w.origin = self._loop.time()
            w.spent = 0
        self._poke_all()

    def _reset_all(self) -> None:
        for c in list(self._conns):
            self._close_conn(c, rst=True)
            self._resets += 1

    # ---- connections -----------------------------------------------------------------------------------------

    async def _on_client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection(self.target[0], self.target[1], limit=READ_CHUNK)
        except OSError:
            _rst(cw)  # the target refused: the client sees a reset, as through a real path to a closed port
            return
        for w in (cw, sw):
            sock = w.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._sockbuf:
            with contextlib.suppress(OSError):
                sw.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._sockbuf)
        conn = _Conn(cw, sw)
        self._conns.add(conn)
        self._conns_total += 1
        loop = asyncio.get_running_loop()
        conn.tasks = [
            loop.create_task(self._pump(conn, cr, self._ways["up"])),
            loop.create_task(self._pump(conn, sr, self._ways["down"])),
        ]

    async def _pump(self, conn: _Conn, reader: asyncio.StreamReader, w: _Way) -> None:
        """Read a source socket into the direction's queue, pausing while the queue is full."""
        loop = asyncio.get_running_loop()
        try:
            while not conn.closed:
                while w.queued >= self.queue_bytes:
                    t0 = loop.time()
                    w.space.clear()
                    await w.space.wait()
                    w.read_paused_s += loop.time() - t0
                    if conn.closed:
                        return
                data = await reader.read(min(READ_CHUNK, self.queue_bytes - w.queued))
                if conn.closed:
                    return
                self._enqueue(w, conn, data or None)
                if not data:
                    return
        except (ConnectionError, OSError):
            self._close_conn(conn, rst=True)  # the source was reset: the reset reaches the other end

    def _enqueue(self, w: _Way, conn: _Conn, data: bytes | None) -> None:
        assert self._loop is not None
        was_empty = not w.queue
        w.queue.append([conn, data, 0, self._loop.time()])
        if data:
            w.queued += len(data)
            w.bytes_in += len(data)
            w.queued_max = max(w.queued_max, w.queued)
        if was_empty:
            w.pacer_alarm.poke()

    def _close_conn(self, conn: _Conn, rst: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        for wr in conn.writers.values():
            if rst:
                _rst(wr)
            else:
                wr.close()
        for w in self._ways.values():
            if any(e[0] is conn for e in w.queue):
                kept: deque[list[Any]] = deque()
                for e in w.queue:
                    if e[0] is conn:
                        if e[1]:
                            w.queued -= len(e[1]) - e[2]
                    else:
                        kept.append(e)
                w.queue = kept
                if w.queued < self.queue_bytes:
                    w.space.set()
            if any(e[1] is conn for e in w.delay_line):
                w.delay_line = deque(e for e in w.delay_line if e[1] is not conn)
        for t in conn.tasks:
            if t is not asyncio.current_task():
                t.cancel()

    # ---- pacing and delivery ---------------------------------------------------------------------------------

    async def _pace(self, w: _Way) -> None:
        """Release queued bytes at the trace's delivery opportunities (see the module docstring).

        ``w.spent`` counts the opportunities since ``w.origin`` that are used or lost; each release uses one per
        started 1500 bytes. Opportunities that find the queue empty are lost, but bytes arriving at an idle link
        may still use the unused ones of the last millisecond: the trace's clock has 1 ms resolution, and in
        Mahimahi a packet arriving during millisecond t may leave at an opportunity stamped t. Time spent
        blocked (blackhole, loss stall, a receiver that does not read) forfeits its opportunities."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            hold = max(self._blackhole_until, w.stall_until)
            if now < hold:
                await w.pacer_alarm.wait(hold if math.isfinite(hold) else None)
                self._forfeit(w, 0.0)
                continue
            if not w.queue:
                await w.pacer_alarm.wait(None)
                self._forfeit(w, IDLE_LOOKBACK_MS)
                continue
            head_conn: _Conn = w.queue[0][0]
            dst = head_conn.writers[w.name]
            if dst.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                with contextlib.suppress(ConnectionError, OSError):
                    await dst.drain()
                self._forfeit(w, 0.0)
                continue
            if w.trace is None:
                self._release(w, math.inf, now)
                continue
            t = (now - w.origin) * 1000.0
            n = w.trace.count_until(t) - w.spent
            if n <= 0:
                await w.pacer_alarm.wait(w.origin + w.trace.next_opportunity(t) / 1000.0)
                continue
            if self._loss > 0.0:
                need = -(-w.queued // PACKET_BYTES) or 1
                lost = next((i for i in range(min(n, need)) if self._rng.random() < self._loss), None)
                if lost is not None:
                    w.spent += self._release(w, lost * PACKET_BYTES, now) + 1  # the lost one is used up too
                    w.losses += 1
                    stall = self._loss_stall_ms if self._loss_stall_ms is not None else max(1.0, 2000 * self._delay_s)
                    w.stall_until = now + stall / 1000.0
                    continue
            w.spent += self._release(w, n * PACKET_BYTES, now)

    def _forfeit(self, w: _Way, lookback_ms: float) -> None:
        """Opportunities before ``lookback_ms`` ago can no longer be used."""
        if w.trace is not None and self._loop is not None:
            w.spent = max(w.spent, w.trace.count_until((self._loop.time() - w.origin) * 1000.0 - lookback_ms))

    def _release(self, w: _Way, budget: float, now: float) -> int:
        """Move up to ``budget`` bytes from the queue's head into the delay line (EOF markers cost nothing);
        returns the delivery opportunities used (one per started 1500 bytes)."""
        q = w.queue
        total = 0
        while q and (budget > 0 or q[0][1] is None):
            e = q[0]
            conn, data, off, t_in = e
            if data is None:
                q.popleft()
                self._emit(w, conn, None, now)
                continue
            k = int(min(budget, len(data) - off))
            piece = data[off : off + k] if (off or k < len(data)) else data
            e[2] = off + k
            budget -= k
            total += k
            w.queued -= k
            w.delay_byte_s += k * (now - t_in)
            w.delay_max_s = max(w.delay_max_s, now - t_in)
            if e[2] >= len(data):
                q.popleft()
            self._emit(w, conn, piece, now)
        if w.queued < self.queue_bytes:
            w.space.set()
        return -(-total // PACKET_BYTES)

    def _emit(self, w: _Way, conn: _Conn, piece: bytes | None, now: float) -> None:
        if self._delay_s <= 0 and not w.delay_line:
            self._deliver(w, conn, piece)
            return
        if not w.delay_line:
            w.delivery_alarm.poke()
        w.delay_line.append((now + self._delay_s, conn, piece))

    async def _deliver_loop(self, w: _Way) -> None:
        """Write bytes whose delay has passed (nothing while a blackhole lasts)."""
        loop = asyncio.get_running_loop()
        while True:
            if not w.delay_line:
                await w.delivery_alarm.wait(None)
                continue
            now = loop.time()
            if now < self._blackhole_until:
                await w.delivery_alarm.wait(self._blackhole_until if math.isfinite(self._blackhole_until) else None)
                continue
            due = w.delay_line[0][0]
            if due > now:
                await w.delivery_alarm.wait(due)
                continue
            while w.delay_line and w.delay_line[0][0] <= now:
                _, conn, piece = w.delay_line.popleft()
                self._deliver(w, conn, piece)

    def _deliver(self, w: _Way, conn: _Conn, piece: bytes | None) -> None:
        if conn.closed:
            return
        dst = conn.writers[w.name]
        if dst.transport.is_closing():
            self._close_conn(conn, rst=True)
            return
        if piece is None:
            with contextlib.suppress(OSError):
                if dst.can_write_eof():
                    dst.write_eof()
            conn.eof_done.add(w.name)
            if len(conn.eof_done) == 2:
                self._close_conn(conn, rst=False)
            return
        dst.write(piece)
        w.bytes_out += len(piece)


def _as_trace(t: Trace | float | str | None) -> Trace | None:
    if t is None or isinstance(t, Trace):
        return t
    return from_spec(t)


def _check_delay(ms: float) -> float:
    if not math.isfinite(ms) or ms < 0:
        raise LinkError(f"one-way delay must be a finite number of ms >= 0, got {ms}")
    return ms / 1000.0
