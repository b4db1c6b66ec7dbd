"""Would warping deep features by a sub-stride shift let a pan reuse them? Measured on a virtual-PTZ pan.

Why: at a pan of V px/frame a stride-S layer's cache is misaligned by V/S feature pixels whenever S does not
divide V, so fast mode recomputes it (RFAP). Deep-feature-flow methods instead warp the previous features
bilinearly by V/S and reuse them. This script measures, layer by layer on consecutive frames of a pure pan,
the error such a warp leaves against the true features, next to the error of the nearest whole-pixel shift
(what a rounding cache would reuse) and the layer's mean magnitude. It runs dense inference only (forward
hooks on every convolution); errors are the median over positions of the max over channels of |Δ|, with the
border columns the pan uncovers left out, averaged over frames.

    python benchmarks/feature_warp.py [--speed 4] [--frames 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from fluxshard.data.fetch import clip_path
from fluxshard.data.ptz import make_ptz_clip
from fluxshard.models import load_model

sys.path.insert(0, str(Path(__file__).parent))
from engine import load_frames
from pan_speed import trajectory


def shifted(y: torch.Tensor, cells: float, bilinear: bool) -> torch.Tensor:
    """``y`` sampled at x + ``cells`` (content moving left by ``cells`` feature pixels per frame)."""
    if not bilinear:
        s = round(cells)
        return torch.roll(y, -s, dims=-1) if s else y
    h, w = y.shape[-2:]
    gx = (torch.arange(w, dtype=torch.float32) + cells + 0.5) / w * 2 - 1
    gy = (torch.arange(h, dtype=torch.float32) + 0.5) / h * 2 - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None]
    return F.grid_sample(y, grid, mode="bilinear", align_corners=False, padding_mode="border")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speed", type=int, default=4, help="pan speed, output px per frame")
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--model", default="nanodet")
    args = ap.parse_args()
    adapter = load_model(args.model)
    body = adapter.body.eval()
    v = args.speed
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "pan.mp4"
        make_ptz_clip(clip_path("vtest"), clip, trajectory(v, args.frames + 5), size=(640, 480))
        _, frames = load_frames(str(clip), args.frames + 5, None)
    convs = {n: m for n, m in body.named_modules() if isinstance(m, torch.nn.Conv2d)}
    feats: dict[str, torch.Tensor] = {}
    for n, m in convs.items():
        m.register_forward_hook(lambda mod, i, o, n=n: feats.__setitem__(n, o.detach().clone()))
    h_in = frames[0][0].shape[-2]
    rows: dict[str, list[tuple[int, float, float, float]]] = {}
    prev: dict[str, torch.Tensor] | None = None
    with torch.inference_mode():
        for x, _ in frames[5:]:  # the pan (after the 5-frame pause)
            body(x.contiguous(memory_format=torch.channels_last))
            cur = dict(feats)
            if prev is not None:
                for n, y in cur.items():
                    s = h_in // y.shape[-2]
                    cut = 2 + int(v / s + 1)  # columns the pan uncovers, and a margin
                    inner = (slice(1, -1), slice(2, -cut))
                    errs = [float((shifted(prev[n], v / s, b) - y).abs().amax(1)[0][inner].median()) for b in (True,
                                                                                                          False)]
                    rows.setdefault(n, []).append((s, errs[0], errs[1], float(y.abs().amax(1)[0][inner].mean())))
            prev = cur
    print(f"pan {v} px/frame, {args.frames} frame pairs, model {args.model}")
    print(f"{'layer':<28}{'stride':>7}{'warped':>9}{'rounded':>9}{'mean |y|':>10}")
    for n, r in rows.items():
        print(f"{n:<28}{r[0][0]:>7}" + "".join(f"{statistics.mean(c[k] for c in r):>9.3f}" for k in (1, 2))
              + f"{statistics.mean(c[3] for c in r):>10.3f}")


if __name__ == "__main__":
    main()
