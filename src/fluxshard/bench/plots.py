"""PNG analogues of the seeds' figures from the bench rows (matplotlib, Agg: no display on this machine).

(a) ``reuse_vs_motion.png`` — scene-reuse share of reused frames per motion bin (seed 000 Fig. 2);
(b) ``residual_mv_alignment.png`` — input residual fraction without (delta, zero field) vs with MV alignment
    (fluxshard-fast) per motion bin, incremental frames only (seed 000 Fig. 3);
(c) ``accuracy_naive_vs_rfap.png`` — retention of naive-mv vs fluxshard-fast vs dense = oracle (seed 000 Fig. 4);
(d) ``layer_active_vs_depth.png`` — per-layer active fraction vs layer index, grouped by input residual
    fraction (seed 000 Fig. 5), from the fast-mode RFAP methods (delta, global-warp, fluxshard-fast);
(e) ``hit_ratio.png`` — hit ratio per method per clip (seed 001 Table 3);
(f) ``speedup_retention.png`` — speedup vs retention mAP@0.5, one point per clip × method, with the fast
    profile's retention target as a dashed line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fluxshard.bench.harness import METHODS, ClipResult, FrameRow
from fluxshard.bench.report import motion_bin, motion_bin_labels

RESIDUAL_GROUPS: tuple[tuple[float, float], ...] = ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 1.01))
PLOT_NAMES = ("reuse_vs_motion.png", "residual_mv_alignment.png", "accuracy_naive_vs_rfap.png",
              "layer_active_vs_depth.png", "hit_ratio.png", "speedup_retention.png")


def _rows(results: Sequence[ClipResult], method: str) -> list[FrameRow]:
    return [r for res in results for r in res.rows if r.method == method]


def _by_bin(rows: Sequence[FrameRow], value: Any) -> tuple[list[float], list[int]]:
    """Mean of ``value(row)`` per motion bin (NaN where empty) and the row count per bin."""
    n = len(motion_bin_labels())
    acc: list[list[float]] = [[] for _ in range(n)]
    for r in rows:
        acc[motion_bin(r.motion_px)].append(value(r))
    return [float(np.mean(a)) if a else float("nan") for a in acc], [len(a) for a in acc]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _legend(ax: Any, **kw: Any) -> None:
    """A legend only when something labelled was drawn: an empty one is a stray box (and a warning)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def plot_reuse_vs_motion(results: Sequence[ClipResult], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    rows = [r for r in _rows(results, "scene-reuse") if r.reason != "first frame"]
    labels = motion_bin_labels()
    if rows:
        vals, counts = _by_bin(rows, lambda r: float(not r.dense))
        ax.bar(labels, np.nan_to_num(vals), color="tab:orange")
        for i, c in enumerate(counts):
            ax.text(i, np.nan_to_num(vals[i]) + 0.02, f"n={c}", ha="center", fontsize=8)
    else:
        _empty(ax, "scene-reuse not run")
    ax.set(xlabel="mean motion (px/frame)", ylabel="frames reused", ylim=(0, 1.1),
           title="Whole-scene cache: reuse ratio vs motion")
    return _save(fig, path)


def plot_residual_alignment(results: Sequence[ClipResult], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = motion_bin_labels()
    xs = np.arange(len(labels))
    for j, (m, name) in enumerate((("delta", "without MV alignment (delta)"),
                                   ("fluxshard-fast", "with MV alignment (fluxshard-fast)"))):
        rows = [r for r in _rows(results, m) if not r.dense]
        if rows:
            vals, _ = _by_bin(rows, lambda r: r.input_residual_fraction)
            ax.bar(xs + (j - 0.5) * 0.4, np.nan_to_num(vals), 0.4, label=name)
    ax.set_xticks(xs, labels)
    ax.set(xlabel="mean motion (px/frame)", ylabel="input residual fraction", ylim=(0, 1),
           title="Residual set without vs with MV alignment")
    _legend(ax, fontsize=8)
    return _save(fig, path)


def plot_accuracy(summaries: Sequence[dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    clips = list(dict.fromkeys(s["clip"] for s in summaries))
    xs = np.arange(len(clips))
    for j, (m, name) in enumerate((("dense", "dense (oracle)"), ("naive-mv", "naive MV reuse"),
                                   ("fluxshard-fast", "RFAP (fluxshard-fast)"))):
        vals = [next((s["retention_map50"] for s in summaries if s["clip"] == c and s["method"] == m), None)
                for c in clips]
        ax.bar(xs + (j - 1) * 0.27, [np.nan if v is None else v for v in vals], 0.27, label=name)
    ax.set_xticks(xs, clips)
    ax.set(ylabel="retention mAP@0.5 (vs dense)", ylim=(0, 1.1), title="Naive MV reuse vs RFAP vs oracle")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_layer_active(results: Sequence[ClipResult], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    rows = [r for m in ("delta", "global-warp", "fluxshard-fast") for r in _rows(results, m)
            if not r.dense and r.layer_active]
    drawn = False
    for lo, hi in RESIDUAL_GROUPS:
        sel = [r.layer_active for r in rows if lo <= r.input_residual_fraction < hi]
        if not sel:
            continue
        n = min(len(s) for s in sel)
        curve = np.mean([s[:n] for s in sel], axis=0)
        ax.plot(np.arange(n), curve, marker=".", label=f"input residual {lo:g}–{min(hi, 1):g} (n={len(sel)})")
        drawn = True
    if not drawn:
        _empty(ax, "no incremental frames")
    ax.set(xlabel="convolution index (execution order)", ylabel="active fraction", ylim=(0, 1.05),
           title="Per-layer active fraction vs depth")
    _legend(ax, fontsize=7)
    return _save(fig, path)


def plot_hit_ratio(summaries: Sequence[dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    clips = list(dict.fromkeys(s["clip"] for s in summaries))
    methods = [m for m in METHODS if any(s["method"] == m for s in summaries)]
    xs = np.arange(len(methods))
    w = 0.8 / max(1, len(clips))
    for j, c in enumerate(clips):
        vals = [next((s["hit_ratio"] for s in summaries if s["clip"] == c and s["method"] == m), np.nan)
                for m in methods]
        ax.bar(xs + (j - (len(clips) - 1) / 2) * w, vals, w, label=c)
    ax.set_xticks(xs, methods, rotation=20)
    ax.set(ylabel="hit ratio (1 − active fraction)", ylim=(0, 1), title="Cache hit ratio per method")
    ax.legend(fontsize=8)
    return _save(fig, path)


MARKER_SIZE = 42.0  # scatter ``s`` (points²) of the trade-off plot's markers


def dodge(points: np.ndarray, spacing: float) -> np.ndarray:
    """Spread points closer than ``spacing`` (display px) sideways into a row, so none hides another.

    Points are grouped transitively (a chain of near neighbours is one group); a group keeps its mean x and
    each member its own y, members sit ``spacing`` apart in input order. A spread group that lands on another
    is merged with it and spread again, until no two points are closer than ``spacing`` along x or y.
    """
    pts = np.asarray(points, float).reshape(-1, 2)
    out = pts.copy()
    groups = [[i] for i in range(len(pts))]
    for _ in range(len(pts)):
        merged = False
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                d = np.abs(out[groups[a]][:, None, :] - out[groups[b]][None, :, :])
                if np.any((d[..., 0] < spacing) & (d[..., 1] < spacing)):
                    groups[a] = sorted(groups[a] + groups[b])
                    del groups[b]
                    merged = True
                    break
            if merged:
                break
        if not merged:
            return out
        g = groups[a]
        cx = pts[g, 0].mean()
        out[g, 0] = cx + (np.arange(len(g)) - (len(g) - 1) / 2) * spacing
        out[g, 1] = pts[g, 1]
    return out


def _left_out(summaries: Sequence[dict[str, Any]], drawn: Sequence[dict[str, Any]]) -> str:
    """``"cup; bikes: delta, naive-mv"``: clips (or clip: methods) without a point, so no absence is silent."""
    parts = []
    for c in dict.fromkeys(s["clip"] for s in summaries):
        missing = [s["method"] for s in summaries if s["clip"] == c and not any(d is s for d in drawn)]
        if missing:
            every = len(missing) == sum(s["clip"] == c for s in summaries)
            parts.append(str(c) if every else f"{c}: {', '.join(missing)}")
    return "; ".join(parts)


def tradeoff_figure(summaries: Sequence[dict[str, Any]], target: float | None = None) -> Any:
    """Speedup vs retention, colour = method, marker = clip; coincident points (dense, exact and scene-reuse
    all sit at retention 1.0 near speedup 1) are spread sideways by a marker width so each stays visible,
    and the legend lists only what is drawn. ``target``: the profiles' retention target, a dashed line."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
    markers = "osD^vP*X"
    pts = [s for s in summaries if s.get("speedup") is not None and s.get("retention_map50") is not None]
    clips = list(dict.fromkeys(s["clip"] for s in pts))
    methods = [m for m in METHODS if any(s["method"] == m for s in pts)]
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    handles: list[Any] = []
    if target is not None:
        handles.append(ax.axhline(target, color="tab:red", ls="--", lw=1, label=f"retention target {target:g}"))
    ax.axvline(1.0, color="grey", lw=0.5)
    left_out = _left_out(summaries, pts)
    notes = [f"not drawn (no speedup or retention): {left_out}"] if left_out else []
    if not pts:
        _empty(ax, "no method with both speedup and retention")
        ax.set_ylim(0, 1.05)
    else:
        xy = np.array([[s["speedup"], s["retention_map50"]] for s in pts], float)
        xs = np.append(xy[:, 0], 1.0)
        ys = np.append(xy[:, 1], [target] if target is not None else [])
        ys = np.append(ys, 1.0)
        padx = max(0.05, 0.08 * (xs.max() - xs.min()))
        pady = max(0.01, 0.08 * (ys.max() - ys.min()))
        ax.set(xlim=(xs.min() - padx, xs.max() + padx), ylim=(ys.min() - pady, ys.max() + pady))
        for m in methods:
            handles.append(ax.scatter([], [], s=MARKER_SIZE, color=colors[m], label=m))
        for i, c in enumerate(clips):
            handles.append(ax.scatter([], [], s=MARKER_SIZE, color="grey", marker=markers[i % len(markers)], label=c))
    ax.set(xlabel="speedup vs dense (same run)", ylabel="retention mAP@0.5 (vs dense)",
           title="Speedup–retention trade-off")
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()  # final axes size first: the spread below is in display pixels
    if pts:
        diameter = np.sqrt(MARKER_SIZE) * fig.dpi / 72
        orig = ax.transData.transform(xy)
        disp = dodge(orig, 1.15 * diameter)
        data = ax.transData.inverted().transform(disp)
        lo, hi = ax.get_xlim()
        ax.set_xlim(min(lo, data[:, 0].min() - padx / 2), max(hi, data[:, 0].max() + padx / 2))
        if not np.allclose(disp, orig):
            notes.append("overlapping points spread sideways")
        for s, (x, y) in zip(pts, data, strict=True):
            ax.scatter([x], [y], s=MARKER_SIZE, color=colors[s["method"]], edgecolors="white", linewidths=0.5,
                       marker=markers[clips.index(s["clip"]) % len(markers)], zorder=3)
    if notes:
        ax.text(0.01, 0.01, "\n".join(notes), transform=ax.transAxes, fontsize=6, color="grey", va="bottom")
    return fig


def plot_tradeoff(summaries: Sequence[dict[str, Any]], path: Path, target: float | None = None) -> Path:
    return _save(tradeoff_figure(summaries, target), path)


def make_plots(results: Sequence[ClipResult], summaries: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Every plot into ``out``; the trade-off plot gets the fast profile's retention target (None: unknown)."""
    a, b, c, d, e, f = (out / n for n in PLOT_NAMES)
    target = next((t for r in results if (t := r.fast_config.get("target_retention")) is not None), None)
    return [plot_reuse_vs_motion(results, a), plot_residual_alignment(results, b), plot_accuracy(summaries, c),
            plot_layer_active(results, d), plot_hit_ratio(summaries, e), plot_tradeoff(summaries, f, target)]
