"""FluxShard: motion-aware incremental CNN inference on real video.

Pipeline (one subpackage each): ``video`` (decode with codec side data) → ``motion`` (per-block motion
fields, accumulation, residual sets) → ``engine`` (sparse incremental inference) → ``models`` (adapters)
→ ``edgecloud`` / ``tiling`` (dispatch and the Uirapuru strategy). ``data`` obtains the real test clips.
"""

__version__ = "0.1.0"
