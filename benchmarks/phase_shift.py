"""How much dense detections change when the input is translated by s px (the CNN's own shift sensitivity).

Any way of reusing features across a camera pan that does not move every layer by whole feature pixels —
warping caches by sub-stride amounts, carrying sub-stride offsets, or running the network on a canvas that
follows the camera so that the caches stay aligned — makes the network see the frame at another sampling
phase than dense inference does. This benchmark measures the accuracy ceiling of all of them: NanoDet on the
same frames, each placed in a zero-padded canvas (``--pad`` px larger per axis) once at offset (p, p) and once
shifted by s px (x, y or both), boxes mapped back to the frame; mAP@0.5 of the shifted run against the unshifted
one (the retention metric every engine result uses). A shift that every stride divides (32 for NanoDet) is
exact up to borders; smaller ones are not.

    python benchmarks/phase_shift.py [CLIP ...] [--frames 30] [--shifts 1,2,4,8,16,32]

Default clips: vtest and a virtual-PTZ clip cut from it (pan, zoom, tilt), at the engine's input size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from fluxshard.data.fetch import clip_path
from fluxshard.metrics import accuracy_retention
from fluxshard.models import load_model
from fluxshard.models.base import Detections

sys.path.insert(0, str(Path(__file__).parent))
from engine import load_frames


def detect(adapter, x: torch.Tensor, oy: int, ox: int, pad: int) -> Detections:  # type: ignore[no-untyped-def]
    """Detections on ``x`` placed at (oy, ox) in a canvas ``pad`` px larger, in the frame's pixels."""
    h, w = x.shape[-2:]
    canvas = torch.nn.functional.pad(x, (ox, pad - ox, oy, pad - oy))
    d = adapter.postprocess_input(adapter.body(canvas), (h + pad, w + pad))
    b = d.boxes.copy()
    b[:, [0, 2]] = (b[:, [0, 2]] - ox).clip(0, w)
    b[:, [1, 3]] = (b[:, [1, 3]] - oy).clip(0, h)
    return Detections(b, d.scores, d.class_ids, d.class_names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("clips", nargs="*")
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--shifts", default="1,2,4,8,16,32")
    ap.add_argument("--pad", type=int, default=64, help="canvas margin per axis (≥ 2 × the largest shift)")
    ap.add_argument("--model", default="nanodet")
    args = ap.parse_args()
    shifts = [int(s) for s in args.shifts.split(",")]
    base = args.pad // 4
    if base + max(shifts) > args.pad:
        ap.error(f"--pad {args.pad} leaves no room for a {max(shifts)} px shift")
    adapter = load_model(args.model)
    tmp = tempfile.TemporaryDirectory()
    clips = [clip_path(c) for c in args.clips]
    if not args.clips:
        from fluxshard.data.ptz import make_ptz_clip

        ptz = Path(tmp.name) / "vtest_ptz.mp4"
        make_ptz_clip(clip_path("vtest"), ptz, "pause:5,pan:4:30,zoom:1.01:20,tilt:-3:20", size=(640, 480))
        clips = [clip_path("vtest"), str(ptz)]
    print(f"mAP@0.5 of detections on the input shifted by s px against the unshifted input ({args.model}, "
          f"{args.frames} frames, canvas +{args.pad} px)")
    print(f"{'clip':<18}{'axis':<6}" + "".join(f"{'s=' + str(s):>8}" for s in shifts))
    with torch.inference_mode():
        for clip in clips:
            _, frames = load_frames(clip, args.frames, None)
            xs = [x for x, _ in frames]
            ref = [detect(adapter, x, base, base, args.pad) for x in xs]
            for axis, (ky, kx) in {"x": (0, 1), "y": (1, 0), "xy": (1, 1)}.items():
                row = f"{Path(clip).name:<18}{axis:<6}"
                for s in shifts:
                    cand = [detect(adapter, x, base + ky * s, base + kx * s, args.pad) for x in xs]
                    r = accuracy_retention(cand, ref, iou_types=["bbox"]).retention["bbox"]["map50"]
                    row += f"{r:>8.3f}"
                print(row, flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
