"""``fluxshard edge``: the edge endpoint of the edge–cloud runtime over a clip (see :mod:`fluxshard.edgecloud.edge`).

Without ``--server`` the command starts ``fluxshard serve`` on loopback as a child process (plaintext, any free
port) and stops it at exit — on errors and Ctrl-C too — so the whole system runs with one command. With
``--link`` / ``--rtt`` a :class:`~fluxshard.edgecloud.link.LinkEmulator` runs in a thread in front of the server
and the runtime talks to it instead, so the emulated link lies on the real path of every byte.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Annotated, Any

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fluxshard.cli._common import Command, emit_summary, err
from fluxshard.errors import FluxShardError

#: Seconds to wait for the embedded server's ``listening on H:P`` line (torch import + model load on a busy box).
SERVER_START_TIMEOUT_S = 120.0
#: Seconds between SIGTERM and SIGKILL when stopping the embedded server.
SERVER_STOP_TIMEOUT_S = 10.0
JPEG_QUALITY = 90


class EmbeddedServer:
    """``fluxshard serve`` as a child process on 127.0.0.1 (plaintext). ``start`` returns the ``host:port`` it
    printed; ``stop`` sends SIGTERM, then SIGKILL after :data:`SERVER_STOP_TIMEOUT_S`. Its stderr goes to a
    temporary file so a failed start can quote its last line."""

    def __init__(self, model: str, mode: str, token_file: Path | None = None) -> None:
        self.cmd = [sys.executable, "-m", "fluxshard", "serve", "--insecure", "--host", "127.0.0.1", "--port", "0",
                    "--model", model, "--mode", mode]
        if token_file is not None:
            self.cmd += ["--token-file", str(token_file)]
        self.proc: subprocess.Popen[str] | None = None
        self._stderr: IO[str] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout_s: float = SERVER_START_TIMEOUT_S) -> str:
        self._stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                     stdin=subprocess.DEVNULL)
        line: list[str] = []

        def read() -> None:  # a thread, so the wait can time out on a child that never prints
            assert self.proc is not None and self.proc.stdout is not None
            for raw in self.proc.stdout:
                if raw.startswith("listening on "):
                    line.append(raw.strip())
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout_s)
        if not line:
            alive = self.proc.poll() is None
            tail = self._stderr_tail()
            self.stop()
            why = f"not listening after {timeout_s:g} s" if alive else f"exited with code {self.proc.returncode}"
            raise FluxShardError(f"embedded server {why}" + (f": {tail}" if tail else ""))
        return line[0].removeprefix("listening on ")

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        lines = [s.strip() for s in self._stderr.read().splitlines() if s.strip()]
        return lines[-1] if lines else ""

    def stop(self) -> None:
        """SIGTERM (clean shutdown), then SIGKILL. Idempotent."""
        p = self.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p is not None and p.stdout is not None:
            p.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM to the edge raises KeyboardInterrupt, so the ``finally`` blocks stop the child server and the
    link (Python's default SIGTERM action kills the process without running them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_sig: int, _frm: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def jpeg_bytes(x: np.ndarray, factor: int) -> int:
    """Size of the engine-input image (integer form: uint8, or uint16 box sums of factor² pixels) as a q90 JPEG:
    what a full-offload edge would send for this frame."""
    from PIL import Image

    img = x if x.dtype == np.uint8 else np.clip(np.rint(x / float(factor * factor)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.tell()


def _parse_target(server: str) -> str:
    host, sep, port = server.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise typer.BadParameter(f"--server must be HOST:PORT, not {server!r}")
    return server


def edge(
    clip: Annotated[str, typer.Argument(help="Video file, URL, or a bundled clip name (bikes, vtest, cup).")],
    server: Annotated[str | None, typer.Option(help="Cloud server HOST:PORT (default: start an embedded one on "
                                                    "loopback, plaintext, stopped at exit).")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="CA certificate (PEM) that signed the server's.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plaintext gRPC to --server (loopback and tests "
                                                              "only).")] = False,
    token_file: Annotated[Path | None, typer.Option(help="File holding the bearer token for the server.")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (nanodet).")] = "nanodet",
    policy: Annotated[str, typer.Option(help="auto (per frame, the faster estimate) | edge | cloud.")] = "auto",
    payload: Annotated[str, typer.Option(help="What goes up: residual (motion field + changed blocks).")
                       ] = "residual",
    link: Annotated[str | None, typer.Option(metavar="TRACE_OR_MBPS", help="Emulated link: Mbit/s, paper-25|"
                                             "paper-56|paper-130, or a Mahimahi trace file (both directions).")
                    ] = None,
    rtt: Annotated[float | None, typer.Option(help="Emulated round-trip time, ms (one-way delay = RTT/2).",
                                              min=0.0)] = None,
    edge_slowdown: Annotated[float, typer.Option(help="Emulate an edge F× slower than this machine (F ≥ 1).",
                                                 min=1.0)] = 1.0,
    mode: Annotated[str, typer.Option(help="exact (outputs equal dense) | fast (thresholded reuse).")] = "exact",
    max_frames: Annotated[int | None, typer.Option(help="Stop after N frames.", min=1)] = None,
    factor: Annotated[int | None, typer.Option(help="Integer input reduction (default: fit 640 px).", min=1)
                      ] = None,
    budget_ms: Annotated[float, typer.Option(help="Per-frame budget, ms: a cloud estimate above it, or a reply "
                                                  "later than it, sends the frame to the edge.", min=0.001)
                         ] = 1000.0,
    connect_timeout: Annotated[float, typer.Option(help="Seconds to reach the server before running without "
                                                        "the cloud.", min=0.1)] = 10.0,
    verify: Annotated[bool, typer.Option("--verify", help="Also run dense inference on every frame's engine "
                                                          "input: max_abs_diff and retention_map50.")] = False,
    jsonl: Annotated[Path | None, typer.Option(help="Write one JSON row per frame to this file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only one JSON object on stdout.")] = False,
) -> None:
    """Run MODEL over CLIP on the edge and/or a cloud server, frame by frame, never losing a frame."""
    from fluxshard.data.fetch import clip_path
    from fluxshard.edgecloud.auth import read_token
    from fluxshard.edgecloud.edge import EdgeRuntime

    if mode not in ("exact", "fast"):
        raise typer.BadParameter(f"--mode must be exact or fast, not {mode!r}")
    if policy not in ("auto", "edge", "cloud"):
        raise typer.BadParameter(f"--policy must be auto, edge or cloud, not {policy!r}")
    accepts_payload = "payload" in inspect.signature(EdgeRuntime.__init__).parameters
    if payload not in ("residual", "bitstream"):
        raise typer.BadParameter(f"--payload must be residual or bitstream, not {payload!r}")
    if payload != "residual" and not accepts_payload:
        raise FluxShardError(f"--payload {payload} is not supported by this edge runtime yet (use residual)")
    if server is not None:
        _parse_target(server)
        if tls_ca is None and not insecure:
            raise FluxShardError("--server needs --tls-ca (TLS) or --insecure (plaintext)")
    elif tls_ca is not None or insecure:
        raise FluxShardError("--tls-ca/--insecure apply to --server only (the embedded server is plaintext on "
                             "loopback)")
    if tls_ca is not None and insecure:
        raise FluxShardError("give either --tls-ca or --insecure, not both")
    token = read_token(token_file) if token_file is not None else None
    path = clip_path(clip)
    need_cloud = policy != "edge"
    srv = EmbeddedServer(model, mode, token_file) if need_cloud and server is None else None
    emu = None
    runtime: EdgeRuntime | None = None
    rows = open(jsonl, "w") if jsonl is not None else None  # noqa: SIM115 - closed in finally
    try:
        with _sigterm_as_interrupt():
            target = server
            if srv is not None:
                target = srv.start()
            link_info: dict[str, Any] | None = None
            link_mbps, link_rtt = 50.0, 20.0  # the estimator's prior without an emulated link
            if need_cloud and (link is not None or rtt is not None):
                from fluxshard.edgecloud.link import LinkEmulator
                from fluxshard.edgecloud.traces import from_spec

                assert target is not None
                trace = from_spec(link) if link is not None else None
                host, _, port = target.rpartition(":")
                emu = LinkEmulator((host.strip("[]"), int(port)), uplink=trace, downlink=trace,
                                   one_way_delay_ms=(rtt or 0.0) / 2)
                target = f"127.0.0.1:{emu.start_in_thread()}"
                link_info = {"trace": link, "mbps_mean": round(trace.mean_mbps, 3) if trace else None,
                             "rtt_ms": rtt or 0.0}
                if trace is not None:
                    link_mbps = trace.mean_mbps
                if rtt is not None:
                    link_rtt = max(rtt, 0.1)
            params = inspect.signature(EdgeRuntime.__init__).parameters
            kw: dict[str, Any] = {"payload": payload} if accepts_payload else {}
            if verify and "raw_outputs" in params:
                kw["raw_outputs"] = True  # cloud frames' raw outputs, for max_abs_diff (more bytes down)
            runtime = EdgeRuntime(
                model, mode, policy, target if need_cloud else None, insecure=tls_ca is None,
                ca_file=tls_ca, token=token, factor=factor, budget_ms=budget_ms, edge_slowdown=edge_slowdown,
                link_mbps=link_mbps, link_rtt_ms=link_rtt, connect_timeout_s=connect_timeout, **kw)
            data, error = _run(runtime, path, max_frames, verify, rows, as_json, mode)
            data["link"] = link_info
            if emu is not None:
                st = emu.stats()
                data["link"].update(up_bytes=st.up.bytes_out, down_bytes=st.down.bytes_out,
                                    up_queue_delay_ms_mean=round(st.up.queue_delay_ms_mean, 3))
            data["server"] = server or ("embedded" if srv is not None else None)
            data["server_pid"] = srv.pid if srv is not None else None  # lets tests check it is gone after exit
            data["error"] = error
    finally:
        if runtime is not None:
            runtime.close()
        if emu is not None:
            emu.stop()
        if srv is not None:
            srv.stop()
        if rows is not None:
            rows.close()
    emit_summary(f"edge: {path}", data, as_json, error)


def _run(runtime: Any, path: str, max_frames: int | None, verify: bool, rows: IO[str] | None, as_json: bool,
         mode: str) -> tuple[dict[str, Any], str | None]:
    """The per-frame loop: returns the summary dict and the input's damage report (None: clean)."""
    import torch

    from fluxshard.edgecloud.dispatch import input_tensor, integer_input
    from fluxshard.engine.run import results_to_frame
    from fluxshard.motion import MotionStream
    from fluxshard.video import open_video

    total = open_video(path).info.frames_expected
    if max_frames is not None:
        total = min(total or max_frames, max_frames)
    stream = MotionStream(path, block=16, max_frames=max_frames, on_error="collect")
    jpeg: list[int] = []
    diffs: list[float] = []
    cand: list[Any] = []
    ref: list[Any] = []
    with Progress(TextColumn("[bold]edge[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True, disable=as_json) as progress:
        task = progress.add_task(f"{Path(str(path)).name} ({mode}, {runtime.policy})", total=total)
        for mf in stream:
            rec = runtime.process(mf)
            mapper = runtime.mapper
            x = integer_input(mapper, mf.frame.rgb)
            jpeg.append(jpeg_bytes(x, mapper.factor))
            row = rec.to_dict()
            if verify:
                with torch.inference_mode():
                    dense = runtime.adapter.body(input_tensor(mapper, x).contiguous(memory_format=torch.channels_last))
                outs = dense if isinstance(dense, list | tuple) else (dense,)
                if rec.outputs:
                    d = max(float(np.max(np.abs(o - r.detach().to(torch.float32).numpy())))
                            for o, r in zip(rec.outputs, outs, strict=True))
                    diffs.append(d)
                    row["max_abs_diff"] = d
                cand.append(rec.results)
                ref.append(results_to_frame(runtime.adapter.postprocess_input(list(outs), mapper.input_hw), mapper))
            if rows is not None:
                rows.write(json.dumps(row) + "\n")
            progress.advance(task)
    data: dict[str, Any] = dict(runtime.summary())
    data["full_offload_jpeg_bytes_per_frame_median"] = float(np.median(jpeg)) if jpeg else None
    if verify:
        data.update(_retention(path, runtime, mode, cand, ref))
        if diffs:  # frames without raw outputs (cloud detections only) have nothing to compare
            data["max_abs_diff"] = max(diffs)
            data["max_abs_diff_frames"] = len(diffs)
    data.update(clip=str(path), mode=mode, policy=runtime.policy,
                input_hw=list(runtime.mapper.input_hw) if runtime.mapper else None)
    return data, stream.video.problem_text() or None


def _retention(path: str, runtime: Any, mode: str, cand: list[Any], ref: list[Any]) -> dict[str, Any]:
    """retention_map50 against dense with ``fluxshard run``'s rules (n/a below the minimum reference objects,
    OKS for pose models), via the same scorer."""
    from fluxshard.engine.run import RunSummary, score_accuracy

    s = RunSummary(str(path), runtime.adapter.name, mode)
    if ref:
        score_accuracy(s, cand, ref)
    out: dict[str, Any] = {"retention_map50": s.retention_map50,
                           "retention_reference_objects": s.retention_reference_objects}
    if s.retention_note:
        out["retention_note"] = s.retention_note
    if s.oks_retention is not None:
        out["oks_retention"] = s.oks_retention
    return out


def register(app: typer.Typer) -> None:
    app.command("edge", cls=Command)(edge)

