"""``tile-bench`` outputs: per-frame and summary CSV, mAP-vs-SLO (Fig. 6) and per-step time breakdown (Fig. 8)
plots, and a markdown report with the miss-rate table (Table 2)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fluxshard.metrics.retention import MIN_REFERENCE_OBJECTS
from fluxshard.tiling.evaluate import MISS_BAR, ClipResult, comparison

SLO_METHODS = ("uirapuru-c", "uirapuru-nc", "remix", "remix-c", "ds", "ut", "ds-c", "ut-c")
LABELS = {"uirapuru-c": "Uirapuru conservative (UC)", "uirapuru-nc": "Uirapuru non-conservative (UNC)",
          "remix": "Remix-like (R)", "remix-c": "Remix-like, p99 model (R-c)", "ds": "down-sampling (DS)",
          "ut": "uniform tiling (UT)", "ds-c": "DS, measured misses <= 1 % (DS-c)",
          "ut-c": "UT, measured misses <= 1 % (UT-c)"}
PARTS = ("preprocess", "dpdp", "uniform", "inference", "merge")


def write_frames_csv(results: Sequence[ClipResult], path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        cols = ["clip", "frame", "method", "slo_ms", "latency_ms", "plan_ms", "infer_ms", "merge_ms", "n_tiles",
                "kind", "models", "fits", "detections", *[f"{p}_ms" for p in PARTS]]
        w.writerow(cols)
        for res in results:
            for r in res.records:
                d = asdict(r)
                w.writerow([Path(res.clip).name, r.frame, r.method, r.slo, round(r.latency_ms, 3),
                            round(r.plan_ms, 3), round(r.infer_ms, 3), round(r.merge_ms, 3), r.n_tiles, r.kind,
                            r.models, r.fits, r.detections, *[round(d["breakdown"].get(p, 0.0), 3) for p in PARTS]])
    return path


def write_summary_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.1f}"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown_tables(rows: Sequence[dict[str, Any]]) -> str:
    """Per clip: mAP per method x SLO (Fig. 6 as a table) and miss rate per method x SLO (Table 2)."""
    out = []
    for clip in dict.fromkeys(r["clip"] for r in rows):
        rs = [r for r in rows if r["clip"] == clip and r["slo_ms"] is not None]
        slos = sorted({r["slo_ms"] for r in rs})
        methods = [m for m in SLO_METHODS if any(r["method"] == m for r in rs)]
        get = {(r["method"], r["slo_ms"]): r for r in rs}
        out.append(f"### {clip}\n")
        notes = sorted({r["map_note"] for r in rows if r["clip"] == clip and r.get("map_note")})
        if notes:  # metrics.retention.MIN_REFERENCE_OBJECTS: too few reference objects for a meaningful mAP
            out.append(f"mAP n/a ('-' below): {'; '.join(notes)} — fewer than {MIN_REFERENCE_OBJECTS} reference "
                       "objects, where one miss moves mAP by more than 1 %\n")
        out.append("mAP@[.5:.95] vs the reference (uniform tiling with the reference member, plus half-cell-shifted "
                   "cells unless --reference plain); DS/UT = the best member whose profiled mean latency fits the "
                   f"SLO, DS-c/UT-c = the best member whose measured miss rate is <= {100 * MISS_BAR:g} % (in "
                   "brackets; ✗ = none qualifies, the cheapest shown)\n")
        out.append("| SLO (ms) | " + " | ".join(methods) + " |")
        out.append("|---" * (len(methods) + 1) + "|")
        for s in slos:
            cells = []
            for m in methods:
                r = get.get((m, s))
                if r is None:
                    cells.append("-")
                    continue
                extra = f" ({r['source'].split('-', 1)[1]})" if m in ("ds", "ut", "ds-c", "ut-c") else ""
                if r.get("fits_slo") is False:
                    extra += " ✗"
                cells.append(_fmt(r["map"]) + extra)
            out.append(f"| {s:g} | " + " | ".join(cells) + " |")
        out.append("\nAP50 vs the same reference (the paper's metric against oracle-model labels, §4.4)\n")
        out.append("| SLO (ms) | " + " | ".join(methods) + " |")
        out.append("|---" * (len(methods) + 1) + "|")
        for s in slos:
            cells = ["-" if get.get((m, s)) is None else _fmt(get[(m, s)]["map50"])
                     + (" ✗" if get[(m, s)].get("fits_slo") is False else "") for m in methods]
            out.append(f"| {s:g} | " + " | ".join(cells) + " |")
        if any(r.get("map_plain_ref") is not None for r in rs):
            out.append("\nmAP@[.5:.95] vs the plain reference (the non-overlapping grid alone, which UT with the "
                       "reference member reproduces exactly)\n")
            out.append("| SLO (ms) | " + " | ".join(methods) + " |")
            out.append("|---" * (len(methods) + 1) + "|")
            for s in slos:
                cells = ["-" if get.get((m, s)) is None else _fmt(get[(m, s)].get("map_plain_ref"))
                         + (" ✗" if get[(m, s)].get("fits_slo") is False else "") for m in methods]
                out.append(f"| {s:g} | " + " | ".join(cells) + " |")
        out.append("\nmAP@[.5:.95] with the frames that missed the SLO counted as empty (late = dropped)\n")
        out.append("| SLO (ms) | " + " | ".join(methods) + " |")
        out.append("|---" * (len(methods) + 1) + "|")
        for s in slos:
            cells = ["-" if get.get((m, s)) is None else _fmt(get[(m, s)].get("map_on_time")) for m in methods]
            out.append(f"| {s:g} | " + " | ".join(cells) + " |")
        comp = [c for c in comparison(rows) if c["clip"] == clip]
        if comp:
            out.append(f"\nUirapuru vs the baselines it is compared with: UC vs DS-c, UT-c and Remix/Remix-c when "
                       f"their measured miss rate is <= {100 * MISS_BAR:g} %; UNC vs DS, UT (profiled mean fits) "
                       "and Remix\n")
            out.append("| SLO (ms) | mode | mAP | miss % | best baseline | its mAP | margin | >= all |")
            out.append("|---|---|---|---|---|---|---|---|")
            for c in comp:
                out.append(f"| {c['slo_ms']:g} | {c['mode']} | {_fmt(c['map'])} | {_fmt(c['miss_rate'], True)} | "
                           f"{c['best_baseline'] or '-'} | {_fmt(c['best_baseline_map'])} | {_fmt(c['margin'])} | "
                           f"{'yes' if c['geq_all'] else 'no'} |")
        out.append("\nSLO miss rate (%) (Table 2) · median frame latency (ms)\n")
        out.append("| SLO (ms) | " + " | ".join(methods) + " |")
        out.append("|---" * (len(methods) + 1) + "|")
        for s in slos:
            cells = []
            for m in methods:
                r = get.get((m, s))
                cells.append("-" if r is None else f"{_fmt(r['miss_rate'], True)} · {r['latency_median_ms']:.0f}")
            out.append(f"| {s:g} | " + " | ".join(cells) + " |")
        out.append("\nUirapuru planning overhead (share of mean frame latency) and elected plan type\n")
        out.append("| SLO (ms) | mode | overhead ms | overhead share | adaptive | uniform | fallback | tiles |")
        out.append("|---|---|---|---|---|---|---|---|")
        for s in slos:
            for m in ("uirapuru-c", "uirapuru-nc", "remix", "remix-c"):
                r = get.get((m, s))
                if r is not None:
                    out.append(f"| {s:g} | {m} | {r['overhead_ms']:.2f} | {_fmt(r['overhead_share'], True)} % | "
                               f"{_fmt(r['adaptive_share'], True)} % | {_fmt(r['uniform_share'], True)} % | "
                               f"{_fmt(r['fallback_share'], True)} % | {r['tiles_mean']:.2f} |")
        fixed = [r for r in rows if r["clip"] == clip and r["slo_ms"] is None]
        if fixed:
            out.append("\nFixed configurations (no SLO)\n")
            out.append("| method | mAP | mAP50 | median ms | p99 ms | tiles |")
            out.append("|---|---|---|---|---|---|")
            for r in fixed:
                out.append(f"| {r['method']} | {_fmt(r['map'])} | {_fmt(r['map50'])} | {r['latency_median_ms']:.1f} "
                           f"| {r['latency_p99_ms']:.1f} | {r['tiles_mean']:.0f} |")
        out.append("")
    return "\n".join(out)


def make_plots(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    paths = []
    clips = list(dict.fromkeys(r["clip"] for r in rows))
    # Fig. 6: mAP vs SLO, one panel per clip.
    fig, axes = plt.subplots(1, len(clips), figsize=(5 * len(clips), 4), squeeze=False)
    for ax, clip in zip(axes[0], clips, strict=True):
        rs = [r for r in rows if r["clip"] == clip and r["slo_ms"] is not None]
        for m in SLO_METHODS:
            # a DS/UT point where no member fits the SLO is not a result at that SLO: left out
            pts = sorted((r["slo_ms"], r["map"]) for r in rs if r["method"] == m and r["map"] is not None
                         and r.get("fits_slo") is not False)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=LABELS[m])
        ax.set_title(clip)
        ax.set_xlabel("latency SLO (ms)")
        ax.set_ylabel("mAP@[.5:.95] vs reference")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    paths.append(_save(fig, out / "map_vs_slo.png"))
    # Fig. 8: mean time per step for Uirapuru (non-conservative if present, else conservative) per SLO.
    fig, axes = plt.subplots(1, len(clips), figsize=(5 * len(clips), 4), squeeze=False)
    for ax, clip in zip(axes[0], clips, strict=True):
        rs = [r for r in rows if r["clip"] == clip and r["slo_ms"] is not None]
        m = "uirapuru-nc" if any(r["method"] == "uirapuru-nc" for r in rs) else "uirapuru-c"
        rs = sorted((r for r in rs if r["method"] == m), key=lambda r: r["slo_ms"])
        if rs:
            x = np.arange(len(rs))
            bottom = np.zeros(len(rs))
            for p in PARTS:
                v = np.array([r[f"{p}_ms"] for r in rs])
                ax.bar(x, v, bottom=bottom, label=p)
                bottom += v
            ax.scatter(x, [r["slo_ms"] for r in rs], marker="_", s=400, color="k", label="SLO")
            ax.set_xticks(x, [f"{r['slo_ms']:g}" for r in rs])
        ax.set_title(f"{clip} · {m}")
        ax.set_xlabel("latency SLO (ms)")
        ax.set_ylabel("mean time per frame (ms)")
    axes[0][0].legend(fontsize=7)
    paths.append(_save(fig, out / "time_breakdown.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: Sequence[ClipResult], rows: Sequence[dict[str, Any]], plots: Sequence[Path],
                 path: Path, profile_info: dict[str, Any]) -> Path:
    lines = ["# Uirapuru tile-bench\n",
             f"Profile: {profile_info.get('path')} (machine {profile_info.get('machine')}, load average at "
             f"profiling {profile_info.get('loadavg')})\n"]
    for r in results:
        rep = f"{np.mean(r.reprojection_px):.2f} px" if r.reprojection_px else "n/a"
        lines.append(f"- {Path(r.clip).name}: {r.size[0]}x{r.size[1]}, {r.frames} frames, camera from {r.camera}, "
                     f"quad-tree depth {r.max_depth}, {r.history_objects} historical objects "
                     f"({r.info.get('history')}), plan runtime estimate {r.plan_runtime_ms:.2f} ms, "
                     f"MV-vs-truth box-centre reprojection error {rep}")
    lines.append("")
    lines.append(markdown_tables(rows))
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    path.write_text("\n".join(lines) + "\n")
    return path
