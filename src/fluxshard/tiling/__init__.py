"""Uirapuru-style PTZ-aware adaptive tiling: relative-size bins, model-family profiles, the distribution
controller (camera tracking and reprojection of historical objects), the DP-DP tile planner, frame inference
(slicing, back-mapping, NMS merge), the bootstrap profiler and the baselines (DS, UT, Remix-like).

Heavy parts (torch models, evaluation) are imported from their modules: ``fluxshard.tiling.infer``,
``fluxshard.tiling.profiler``, ``fluxshard.tiling.baselines``, ``fluxshard.tiling.evaluate``.
"""

from fluxshard.tiling.bins import EDGES, N_BINS, bin_index, relative_size
from fluxshard.tiling.planner import PlanResult, QuadTree, Tile, TilePlan, TilePlanner, dpdp, max_depth_for
from fluxshard.tiling.profile import FamilyProfile, ModelProfile, ProfileError, load_profile, synthetic_family

__all__ = [
    "EDGES", "N_BINS", "FamilyProfile", "ModelProfile", "PlanResult", "ProfileError", "QuadTree", "Tile", "TilePlan",
    "TilePlanner", "bin_index", "dpdp", "load_profile", "max_depth_for", "relative_size", "synthetic_family",
]
