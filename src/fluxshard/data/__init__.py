"""Test and demo data: verified real clips (:mod:`.fetch`), virtual PTZ clips with exact motion (:mod:`.ptz`).

``fetch`` itself is not re-exported so that ``fluxshard.data.fetch`` always names the module; call
``fluxshard.data.fetch.fetch(...)``.
"""

from fluxshard.data.fetch import CLIPS, ClipSpec, cache_dir, clip_path

__all__ = ["CLIPS", "ClipSpec", "cache_dir", "clip_path"]
