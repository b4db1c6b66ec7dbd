"""Test and demo data: verified real clips (:mod:`.fetch`) and virtual PTZ clips with exact camera motion."""

from fluxshard.data.fetch import CLIPS, ClipSpec, cache_dir, clip_path, fetch

__all__ = ["CLIPS", "ClipSpec", "cache_dir", "clip_path", "fetch"]
