"""Per clip × method summaries, the per-frame CSV and the markdown report of ``fluxshard bench``.

Definitions (also written into the report, so a reader of the file alone knows them):

* **speedup** = median dense ms / median method ms, both from the same run (the machine is shared; only
  same-run ratios mean anything);
* **retention** = mAP@0.5 and mAP@[.5:.95] of the method's detections scored against the dense run's
  detections (reference = dense outputs, not ground truth), via :func:`fluxshard.metrics.accuracy_retention`;
  n/a, with the count, when the dense run holds fewer than ``MIN_REFERENCE_OBJECTS`` confident detections
  (a retention over a near-empty reference is noise: see :mod:`fluxshard.metrics.retention`);
* **hit ratio** = 1 − mean active fraction over all frames (dense frames count as 0 hits): the share of
  convolution output positions taken from the cache; for ``scene-reuse`` the share of frames reused;
* **input residual** = mean input residual fraction over frames computed incrementally (dense frames excluded).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fluxshard.bench.harness import METHODS, ClipResult, FrameRow
from fluxshard.metrics import DENSE_REFERENCE, MIN_REFERENCE_OBJECTS, accuracy_retention

# Motion bins (mean |MV| of the frame field over valid blocks, px/frame at frame resolution): static camera
# codec jitter stays under 0.5 px; slow pans 0.5-2, the virtual PTZ pans 2-4, fast motion above.
MOTION_BINS: tuple[float, ...] = (0.0, 0.5, 2.0, 4.0, 8.0, math.inf)


def motion_bin_labels() -> list[str]:
    e = MOTION_BINS
    return [f"{e[i]:g}-{e[i + 1]:g}" if math.isfinite(e[i + 1]) else f"≥{e[i]:g}" for i in range(len(e) - 1)]


def motion_bin(px: float) -> int:
    return int(np.searchsorted(MOTION_BINS, px, side="right") - 1)


def _finite(v: Any) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def summarize(res: ClipResult) -> list[dict[str, Any]]:
    """One dict per method with the means the report's table shows."""
    dense_rows = res.by_method("dense")
    dense_ms = float(np.median([r.ms for r in dense_rows])) if dense_rows else float("nan")
    dense_dets = [r.detections for r in dense_rows]
    out = []
    for m in METHODS:
        rows = res.by_method(m)
        if not rows:
            continue
        ms = float(np.median([r.ms for r in rows]))
        rep = accuracy_retention([r.detections for r in rows], dense_dets, iou_types=["bbox"])
        ret = rep.retention.get("bbox", {})
        inc = [r.input_residual_fraction for r in rows if not r.dense]
        inc_act = [r.active_fraction for r in rows if not r.dense]
        out.append({
            "clip": res.clip, "method": m, "frames": len(rows), "input_hw": list(res.input_hw),
            "ms_median": round(ms, 3), "dense_ms_median": round(dense_ms, 3),
            "speedup": round(dense_ms / ms, 4) if ms > 0 else None,
            "retention_map50": _finite(ret.get("map50")), "retention_map": _finite(ret.get("map")),
            "retention_reference": rep.reference,
            "retention_reference_objects": rep.reference_objects.get("bbox", 0),
            "retention_note": rep.notes.get("bbox"),
            "hit_ratio": round(1.0 - float(np.mean([r.active_fraction for r in rows])), 4),
            "incremental_hit_ratio": round(1.0 - float(np.mean(inc_act)), 4) if inc_act else None,
            "input_residual_fraction": round(float(np.mean(inc)), 4) if inc and m != "scene-reuse" else None,
            "dense_frames": sum(r.dense for r in rows),
            "max_abs_diff": float(max(r.max_abs_diff for r in rows)),
            "motion_px_mean": round(float(np.mean([r.motion_px for r in rows])), 3),
        })
    return out


def motion_bin_table(results: Sequence[ClipResult]) -> list[dict[str, Any]]:
    """Per motion bin, pooled over clips (incremental frames only): input residual without MV alignment
    (delta, zero field) vs with it (fluxshard-fast), hit ratios, and the scene-reuse share of reused frames —
    the numbers behind plots (a) and (b)."""
    labels = motion_bin_labels()
    out = []
    for i, label in enumerate(labels):
        def sel(m: str, inc: bool = True, i: int = i) -> list[FrameRow]:
            return [r for res in results for r in res.by_method(m)
                    if motion_bin(r.motion_px) == i and (not inc or not r.dense)]

        delta, fast, scene = sel("delta"), sel("fluxshard-fast"), sel("scene-reuse", inc=False)
        scene = [r for r in scene if r.reason != "first frame"]

        def mean(rows: list[FrameRow], f: Any) -> float | None:
            return round(float(np.mean([f(r) for r in rows])), 4) if rows else None

        out.append({
            "motion_bin": label, "frames": len(fast),
            "residual_without_mv": mean(delta, lambda r: r.input_residual_fraction),
            "residual_with_mv": mean(fast, lambda r: r.input_residual_fraction),
            "hit_ratio_delta": mean(delta, lambda r: 1 - r.active_fraction),
            "hit_ratio_fast": mean(fast, lambda r: 1 - r.active_fraction),
            "scene_reuse_ratio": mean(scene, lambda r: float(not r.dense)),
        })
    return out


def motion_bin_markdown(table: Sequence[dict[str, Any]]) -> str:
    lines = ["| motion bin (px/frame) | frames | input residual without MV (delta) | with MV (fluxshard-fast) "
             "| hit ratio delta | hit ratio fluxshard-fast | scene-reuse frames reused |", "|" + "---|" * 7]
    for t in table:
        lines.append(f"| {t['motion_bin']} | {t['frames']} | {_fmt(t['residual_without_mv'])} "
                     f"| {_fmt(t['residual_with_mv'])} | {_fmt(t['hit_ratio_delta'])} | {_fmt(t['hit_ratio_fast'])} "
                     f"| {_fmt(t['scene_reuse_ratio'])} |")
    return "\n".join(lines)


CSV_FIELDS = ("clip", "method", "frame", "motion_px", "input_residual_fraction", "active_fraction",
              "layer_active_mean", "layer_active_first", "layer_active_last", "layer_active", "ms", "dense",
              "reason", "max_abs_diff", "n_dets")


def write_csv(rows: Sequence[FrameRow], path: Path) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(r.csv_dict())
    return path


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _retention_cell(s: dict[str, Any], key: str) -> str:
    """A retention, or why there is none: ``n/a (only N reference objects ≥ score s)``."""
    v = s.get(key)
    if v is None and s.get("retention_note"):
        return str(s["retention_note"])
    return _fmt(v)


def markdown_table(summaries: Sequence[dict[str, Any]], target: float | None = None) -> str:
    """The table of means; with ``target`` (the profiles' retention target), a retention below it is marked †
    and a note follows: speed bought with accuracy is not comparable with speed at the target. A retention
    over too few reference objects reads "n/a (only N …)" and a note gives the minimum."""
    head = ("| clip (input) | method | frames | speedup vs dense | ms (median) | retention mAP@0.5 | retention mAP "
            "| reference objects | hit ratio | input residual | dense frames | max abs diff |")
    lines = [head, "|" + "---|" * 12]
    short = few = False
    for s in summaries:
        hw = s["input_hw"]
        r = s["retention_map50"]
        mark = ""
        if target is not None and r is not None and np.isfinite(r) and r < target:
            mark, short = " †", True
        few |= r is None and bool(s.get("retention_note"))
        lines.append(
            f"| {s['clip']} ({hw[1]}×{hw[0]}) | {s['method']} | {s['frames']} | {_fmt(s['speedup'], 2)} "
            f"| {_fmt(s['ms_median'], 1)} | {_retention_cell(s, 'retention_map50')}{mark} "
            f"| {'n/a' if s.get('retention_map') is None and s.get('retention_note') else _fmt(s['retention_map'])} "
            f"| {_fmt(s.get('retention_reference_objects'))} "
            f"| {_fmt(s['hit_ratio'])} | {_fmt(s['input_residual_fraction'])} | {s['dense_frames']} "
            f"| {s['max_abs_diff']:.2g} |"
        )
    if short:
        lines += ["", f"† below the profiles' retention target ({target:g} mAP@0.5 against dense): that method's "
                      f"speed and hit ratio are bought with accuracy and not comparable with those of methods at the "
                      f"target."]
    if few:
        lines += ["", f"n/a: the dense run holds fewer than {MIN_REFERENCE_OBJECTS} detections with score ≥ "
                      f"{DENSE_REFERENCE.min_score:g} on that clip; one miss among so few moves mAP by more than the "
                      f"1 % the retention target allows, so no retention is given."]
    return "\n".join(lines)


def mean_retention(summaries: Sequence[dict[str, Any]], method: str, key: str = "retention_map50") -> float | None:
    """Mean of one method's retention over the clips that define it (clips with too few reference objects
    are skipped, not counted as 0 or 1); None when no clip does."""
    vals = [s[key] for s in summaries if s["method"] == method and s.get(key) is not None]
    return float(np.mean(vals)) if vals else None


SUMMARY_CSV_FIELDS = ("clip", "method", "frames", "speedup", "ms_median", "dense_ms_median", "retention_map50",
                      "retention_map", "retention_reference_objects", "retention_note", "hit_ratio",
                      "incremental_hit_ratio", "input_residual_fraction", "dense_frames", "max_abs_diff")


def write_summary_csv(summaries: Sequence[dict[str, Any]], path: Path) -> Path:
    """The table of means as CSV: an undefined retention is ``n/a`` next to its reference-object count."""
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=SUMMARY_CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for s in summaries:
            row = {k: s.get(k) for k in SUMMARY_CSV_FIELDS}
            for k in ("retention_map50", "retention_map"):
                if row[k] is None:
                    row[k] = "n/a"
            w.writerow({k: "" if v is None else v for k, v in row.items()})
    return path


def write_report(results: Sequence[ClipResult], summaries: Sequence[dict[str, Any]], plots: Sequence[Path],
                 path: Path, scene_threshold: float, model: str) -> Path:
    """``report.md`` at ``path`` and the table of means as ``summary.csv`` beside it."""
    fast = results[0].fast_config if results else {}
    parts = [
        "# fluxshard bench report", "",
        f"Model: {model}. Clips: "
        + ", ".join(f"{r.clip} ({r.path}, MV source {r.mv_source}, timer {r.timer})" for r in results) + ".", "",
        "## Table of means (per clip × method; also `summary.csv`)", "",
        markdown_table(summaries, fast.get("target_retention")), "",
        "## By motion bin (all clips pooled, incrementally computed frames)", "",
        motion_bin_markdown(motion_bin_table(results)), "",
        "## Definitions", "",
        "- **speedup vs dense** = median dense ms / median method ms, measured in the same run (frames "
        "interleaved, method order rotated per frame). The machine is shared and noisy: only these same-run "
        "ratios are meaningful, not absolute ms.",
        "- **retention** = mAP@0.5 / mAP@[.5:.95] of the method's detections scored against the **dense "
        "outputs** (reference = dense run's detections, not ground truth); dense is 1.0 by construction. "
        f"**reference objects** = the dense detections with score ≥ {DENSE_REFERENCE.min_score:g} it is scored "
        f"against; below {MIN_REFERENCE_OBJECTS} the retention is n/a (one miss would move it by more than 1 %).",
        "- **hit ratio** = 1 − mean active fraction over all frames: share of convolution output positions "
        "reused from the cache (mean over convolutions, dense frames count as 0 hits); for scene-reuse, the "
        "share of frames whose whole result was reused.",
        "- **input residual** = mean input residual fraction over incrementally computed frames: `delta` "
        "measures it without MV alignment (zero field), `global-warp` with one global similarity, the "
        "fluxshard methods with the per-block field; each with its profile's τ_in (see Methods).",
        "- **max abs diff** = largest |body output − dense body output| over the clip.", "",
        "## Methods", "",
        "- Fast-mode thresholds (fluxshard-fast, naive-mv"
        + "".join(f", {m}" for m in ("delta", "global-warp") if m not in fast.get("own_profiles", {}))
        + f"): τ_in = {fast.get('own_tau_in', {}).get('fluxshard-fast', fast.get('tau_in'))} (per bin when a list), "
        + (f"per-layer τ^l by motion bin (upper edges {fast.get('motion_bins')} engine-input px/frame, mean τ^l "
           f"{[round(v, 3) for v in fast.get('bin_alpha_tau_mean', [])]}), the bin chosen from the frame's real "
           f"motion for every method." if fast.get("motion_bins") else
           f"τ^l = {fast.get('default_threshold')} (per-layer overrides: {len(fast.get('thresholds', {}))})."),
        *[f"- {m}: its own shipped profile (`fluxshard profile --method {m}`, same retention target), "
          f"mean τ^l per bin {[round(v, 3) for v in taus]}, τ_in per bin {fast.get('own_tau_in', {}).get(m, '?')}."
          for m, taus in fast.get("own_profiles", {}).items()],
        f"- scene-reuse: reuse the previous result when mean |Δ| of the 8×-downsampled luma vs the last computed "
        f"frame < {scene_threshold} grey levels, else recompute densely.",
        "- Motion bins (mean |MV| over valid blocks, px/frame, frame pixels): " + ", ".join(motion_bin_labels())
        + ".", "",
        "## Plots", "",
    ]
    parts += [f"![{p.stem}]({p.name})" for p in plots]
    path.write_text("\n".join(parts) + "\n")
    write_summary_csv(summaries, path.with_name("summary.csv"))
    return path
