"""Compact Results downlink (``Hello.results = RESULTS_DETECTIONS``): the model's decoded results instead of its raw
outputs.

Why: NanoDet's raw outputs at 320x320 are ~2.75 MB per Result (float32 heads, zstd barely helps), far more than the
uplink payload they answer; the decoded detections are a few hundred bytes. The server runs the adapter's
``postprocess_input(outputs, input_hw)`` (results in *engine-input* pixels; the edge maps them to the frame with its
own mapper, as it does for frames it runs itself) and sends named tensors:

* detections (:class:`~fluxshard.models.base.Detections`): ``boxes`` float32 N×4 (xyxy), ``scores`` float32 N,
  ``classes`` int32 N;
* pose (:class:`~fluxshard.models.base.Keypoints`): ``keypoints`` float32 N×K×3 (x, y, score), ``scores`` float32
  N, ``boxes`` float32 N×4.

Values are copied bit for bit (float32 stays float32; class ids fit int32), so :func:`decode_results` gives back
exactly what the server computed. Segmentation masks are not carried (a server refuses DETECTIONS for them).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fluxshard.edgecloud import wire
from fluxshard.edgecloud.proto import fluxshard_pb2 as pb
from fluxshard.models.base import COCO_CLASSES, COCO_KEYPOINTS, Detections, Keypoints, Segmentations

DETECTION_NAMES = ("boxes", "scores", "classes")
POSE_NAMES = ("keypoints", "scores", "boxes")
MAX_INSTANCES = 1 << 16  # per Result: far above any model's max_detections


def encode_results(results: Detections | Keypoints) -> dict[str, pb.Tensor]:
    """Decoded results → the named tensors of a Result (see the module docstring)."""
    if isinstance(results, Segmentations):
        raise ValueError("segmentation masks are not carried by compact results; use RESULTS_RAW")
    if isinstance(results, Detections):
        arrays = {"boxes": results.boxes.astype(np.float32), "scores": results.scores.astype(np.float32),
                  "classes": results.class_ids.astype(np.int32)}
    elif isinstance(results, Keypoints):
        arrays = {"keypoints": results.keypoints.astype(np.float32), "scores": results.scores.astype(np.float32),
                  "boxes": results.boxes.astype(np.float32)}
    else:
        raise TypeError(f"cannot encode {type(results).__name__} as compact results")
    return {name: wire.encode_tensor(np.ascontiguousarray(a)) for name, a in arrays.items()}


def decode_results(msg: pb.Result | Mapping[str, pb.Tensor], *, class_names: tuple[str, ...] = COCO_CLASSES,
                   keypoint_names: tuple[str, ...] = COCO_KEYPOINTS,
                   limits: wire.WireLimits = wire.DEFAULT_LIMITS) -> Detections | Keypoints:
    """A compact Result (or its ``outputs`` map) → :class:`Detections` or :class:`Keypoints`, whichever names it
    carries; anything else (raw outputs, wrong dtypes or shapes) raises :class:`~fluxshard.edgecloud.wire.WireError`."""
    outputs = msg.outputs if isinstance(msg, pb.Result) else msg
    names = set(outputs)
    kw = {"max_bytes": limits.max_decoded_bytes}
    f32 = frozenset({"float32"})

    def get(name: str, dtypes: frozenset[str], shape: tuple[int | None, ...]) -> np.ndarray:
        a = wire.decode_tensor(outputs[name], allowed_dtypes=dtypes, expect_shape=shape, field=f"result.{name}", **kw)
        if len(a) > MAX_INSTANCES:
            raise wire.WireError(f"result.{name}: {len(a)} instances, at most {MAX_INSTANCES}")
        return a

    if names == set(DETECTION_NAMES):
        boxes = get("boxes", f32, (None, 4))
        n = len(boxes)
        scores = get("scores", f32, (n,))
        classes = get("classes", frozenset({"int32"}), (n,))
        if n and (int(classes.min()) < 0 or int(classes.max()) >= len(class_names)):
            raise wire.WireError(f"result.classes: ids outside 0-{len(class_names) - 1}")
        return Detections(boxes.copy(), scores.copy(), classes.astype(np.int64), class_names)
    if names == set(POSE_NAMES):
        kp = get("keypoints", f32, (None, len(keypoint_names), 3))
        n = len(kp)
        return Keypoints(kp.copy(), get("scores", f32, (n,)).copy(), get("boxes", f32, (n, 4)).copy(),
                         keypoint_names)
    raise wire.WireError(f"result: outputs {sorted(names)[:8]} are neither {list(DETECTION_NAMES)} "
                         f"nor {list(POSE_NAMES)}")
