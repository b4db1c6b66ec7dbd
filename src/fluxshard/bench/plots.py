"""PNG analogues of the seeds' figures from the bench rows (matplotlib, Agg: no display on this machine).

(a) ``reuse_vs_motion.png`` — scene-reuse share of reused frames per motion bin (seed 000 Fig. 2);
(b) ``residual_mv_alignment.png`` — input residual fraction without (delta, zero field) vs with MV alignment
    (fluxshard-fast) per motion bin, incremental frames only (seed 000 Fig. 3);
(c) ``accuracy_naive_vs_rfap.png`` — retention of naive-mv vs fluxshard-fast vs dense = oracle (seed 000 Fig. 4);
(d) ``layer_active_vs_depth.png`` — per-layer active fraction vs layer index, grouped by input residual
    fraction (seed 000 Fig. 5), from the fast-mode RFAP methods (delta, global-warp, fluxshard-fast);
(e) ``hit_ratio.png`` — hit ratio per method per clip (seed 001 Table 3);
(f) ``speedup_retention.png`` — speedup vs retention mAP@0.5, one point per clip × method.
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
    ax.legend(fontsize=8)
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
    ax.legend(fontsize=7)
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


def plot_tradeoff(summaries: Sequence[dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    markers = "osD^vP*X"
    clips = list(dict.fromkeys(s["clip"] for s in summaries))
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for s in summaries:
        if s["speedup"] is None or s["retention_map50"] is None:
            continue
        ax.scatter(s["speedup"], s["retention_map50"], color=colors[s["method"]],
                   marker=markers[clips.index(s["clip"]) % len(markers)])
    for m in METHODS:
        ax.scatter([], [], color=colors[m], label=m)
    for i, c in enumerate(clips):
        ax.scatter([], [], color="grey", marker=markers[i % len(markers)], label=c)
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set(xlabel="speedup vs dense (same run)", ylabel="retention mAP@0.5 (vs dense)",
           title="Speedup–retention trade-off")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def make_plots(results: Sequence[ClipResult], summaries: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    a, b, c, d, e, f = (out / n for n in PLOT_NAMES)
    return [plot_reuse_vs_motion(results, a), plot_residual_alignment(results, b), plot_accuracy(summaries, c),
            plot_layer_active(results, d), plot_hit_ratio(summaries, e), plot_tradeoff(summaries, f)]
