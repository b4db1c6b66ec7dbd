"""``fluxshard bench``: every method (dense, baselines, FluxShard) as a mode of one harness, with CSV, plots
and a markdown report (issue 5)."""

from fluxshard.bench.harness import METHODS, BenchConfig, ClipResult, FrameRow, bench_clip, parse_methods

__all__ = ["METHODS", "BenchConfig", "ClipResult", "FrameRow", "bench_clip", "parse_methods"]
