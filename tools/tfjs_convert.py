"""Read a TF.js graph model (model.json + weight shards) into named numpy arrays, and convert
the two bundled FluxShard models (NanoDet, MoveNet Thunder) into fp16 ``.npz`` weight files.

Usage::

    python tools/tfjs_convert.py inspect MODEL.json            # print the simplified op list
    python tools/tfjs_convert.py nanodet MODEL.json OUT.npz    # convert NanoDet weights
    python tools/tfjs_convert.py movenet MODEL.json OUT.npz    # convert MoveNet weights

The graph reader handles the dtypes that TF.js ``weightsManifest`` entries can carry: float32, int32,
bool, plus the converter's quantisation (``quantization: {dtype: float16|uint8|uint16, ...}``) and inline
``Const`` tensors stored in the node's ``attr.value.tensor`` (``tensorContent`` base64 or ``*Val`` lists).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_TF_DTYPES = {
    "DT_FLOAT": np.float32,
    "DT_INT32": np.int32,
    "DT_INT64": np.int64,
    "DT_BOOL": np.bool_,
    "DT_HALF": np.float16,
    "DT_UINT8": np.uint8,
}
_MANIFEST_DTYPES = {
    "float32": np.float32,
    "int32": np.int32,
    "bool": np.bool_,
    "float16": np.float16,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "int8": np.int8,
    "int16": np.int16,
}


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str]
    attr: dict

    def attr_list(self, key: str) -> list[int]:
        return [int(v) for v in self.attr.get(key, {}).get("list", {}).get("i", [])]

    def attr_str(self, key: str) -> str:
        s = self.attr.get(key, {}).get("s")
        return base64.b64decode(s).decode() if s else ""

    def attr_float(self, key: str, default: float = 0.0) -> float:
        return float(self.attr.get(key, {}).get("f", default))

    def attr_bool(self, key: str) -> bool:
        return bool(self.attr.get(key, {}).get("b", False))

    def attr_strs(self, key: str) -> list[str]:
        return [base64.b64decode(s).decode() for s in self.attr.get(key, {}).get("list", {}).get("s", [])]


@dataclass
class Graph:
    nodes: dict[str, Node]
    consts: dict[str, np.ndarray]
    order: list[str]
    signature: dict = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)

    def node(self, ref: str) -> Node:
        return self.nodes[ref.split(":")[0].lstrip("^")]

    def const(self, ref: str) -> np.ndarray:
        return self.consts[ref.split(":")[0]]

    def is_const(self, ref: str) -> bool:
        return ref.split(":")[0] in self.consts

    def consumers(self, name: str) -> list[Node]:
        return [n for n in self.nodes.values() if any(i.split(":")[0] == name for i in n.inputs)]


def _inline_tensor(tensor: dict) -> np.ndarray:
    dtype = _TF_DTYPES[tensor.get("dtype", "DT_FLOAT")]
    shape = [int(d.get("size", 0)) for d in tensor.get("tensorShape", {}).get("dim", [])]
    if "tensorContent" in tensor:
        arr = np.frombuffer(base64.b64decode(tensor["tensorContent"]), dtype=dtype).copy()
    else:
        for key in ("floatVal", "intVal", "int64Val", "boolVal", "halfVal"):
            if key in tensor:
                arr = np.array(tensor[key], dtype=dtype)
                break
        else:
            arr = np.zeros(0, dtype=dtype)
    size = int(np.prod(shape)) if shape else 1
    if arr.size == 1 and size != 1:
        arr = np.full(size, arr.item(), dtype=dtype)
    return arr.reshape(shape)


def _read_manifest(model_dir: Path, manifest: list[dict], sha: dict[str, str]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for group in manifest:
        blob = b""
        for p in group["paths"]:
            data = (model_dir / p).read_bytes()
            sha[p] = hashlib.sha256(data).hexdigest()
            blob += data
        offset = 0
        for w in group["weights"]:
            shape = [int(s) for s in w["shape"]]
            count = int(np.prod(shape)) if shape else 1
            q = w.get("quantization")
            if w["dtype"] == "string":
                raise ValueError(f"string weights are not supported ({w['name']})")
            if q:
                qdt = np.dtype(_MANIFEST_DTYPES[q["dtype"]])
                raw = np.frombuffer(blob, dtype=qdt, count=count, offset=offset)
                offset += count * qdt.itemsize
                if q["dtype"] == "float16":
                    arr = raw.astype(np.float32)
                elif "scale" in q:  # affine uint8/uint16 quantisation
                    arr = raw.astype(np.float32) * np.float32(q["scale"]) + np.float32(q["min"])
                else:  # lookup-table quantisation ("float16" table indexed by uint8/uint16)
                    table = np.asarray(q["table"], dtype=np.float32)
                    arr = table[raw]
                arr = arr.astype(_MANIFEST_DTYPES[w["dtype"]])
            else:
                dt = np.dtype(_MANIFEST_DTYPES[w["dtype"]])
                arr = np.frombuffer(blob, dtype=dt, count=count, offset=offset).copy()
                offset += count * dt.itemsize
            out[w["name"]] = arr.reshape(shape)
        if offset != len(blob):
            raise ValueError(f"weight shard size mismatch: read {offset} of {len(blob)} bytes")
    return out


def load_graph(path: str | Path) -> Graph:
    """Parse a TF.js ``graph-model`` JSON and its weight shards."""
    path = Path(path)
    spec = json.loads(path.read_text())
    if spec.get("format") != "graph-model":
        raise ValueError(f"{path}: not a TF.js graph-model (format={spec.get('format')!r})")
    sha = {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    consts = _read_manifest(path.parent, spec["weightsManifest"], sha)
    nodes: dict[str, Node] = {}
    order: list[str] = []
    for raw in spec["modelTopology"]["node"]:
        n = Node(raw["name"], raw["op"], list(raw.get("input", [])), raw.get("attr", {}))
        nodes[n.name] = n
        order.append(n.name)
        if n.op == "Const" and n.name not in consts and "value" in n.attr:
            consts[n.name] = _inline_tensor(n.attr["value"]["tensor"])
    return Graph(nodes, consts, order, spec.get("signature", {}), sha)


def topo_order(g: Graph) -> list[Node]:
    """Non-const nodes in a dependency order (stable w.r.t. the JSON order)."""
    seen: set[str] = set()
    out: list[Node] = []

    def visit(name: str) -> None:
        stack = [(name, False)]
        while stack:
            cur, done = stack.pop()
            if done:
                if cur not in seen:
                    seen.add(cur)
                    out.append(g.nodes[cur])
                continue
            if cur in seen:
                continue
            stack.append((cur, True))
            for i in reversed(g.nodes[cur].inputs):
                dep = i.split(":")[0].lstrip("^")
                if dep not in seen and dep in g.nodes:
                    stack.append((dep, False))

    for name in g.order:
        visit(name)
    return [n for n in out if n.op != "Const"]


def inspect(g: Graph, file=sys.stdout) -> None:
    for n in topo_order(g):
        ins = []
        for i in n.inputs:
            if g.is_const(i):
                c = g.const(i)
                ins.append(f"{i}={c.tolist()}" if c.size <= 8 else f"{i}<{list(c.shape)}>")
            else:
                ins.append(i)
        keep = {k: v for k, v in n.attr.items() if k in ("strides", "padding", "dilations", "alpha",
                                                        "fused_ops", "half_pixel_centers", "align_corners",
                                                        "ksize", "explicit_paddings", "num_args")}
        print(n.op, n.name, ins, json.dumps(keep), file=file)


# --------------------------------------------------------------------------------------------------
# NanoDet: ONNX->TF export; every conv is Pad(NHWC or NCHW) -> Transpose -> Conv2D(VALID) -> Add(bias)
# --------------------------------------------------------------------------------------------------


def _upstream(g: Graph, ref: str, through: tuple[str, ...] = ("Transpose", "Identity")) -> Node:
    n = g.node(ref)
    while n.op in through:
        n = g.node(n.inputs[0])
    return n


def nanodet_convs(g: Graph) -> list[dict]:
    """Every Conv2D of the NanoDet graph in topological order with its weights and explicit padding."""
    convs = []
    for n in topo_order(g):
        if n.op != "Conv2D":
            continue
        if n.attr_str("padding") != "VALID":
            raise ValueError(f"{n.name}: expected VALID padding after an explicit Pad, got "
                             f"{n.attr_str('padding')}")
        w = g.const(n.inputs[1])  # HWIO
        src = _upstream(g, n.inputs[0])
        pad = [0, 0, 0, 0]  # top, bottom, left, right
        if src.op == "Pad":
            p = g.const(src.inputs[1])
            # The ONNX->TF export pads before the NCHW->NHWC transpose (rows N, C, H, W); plain TF: NHWC.
            layout_nchw = _pad_layout_is_nchw(g, src, n)
            hw = (p[2], p[3]) if layout_nchw else (p[1], p[2])
            pad = [int(hw[0][0]), int(hw[0][1]), int(hw[1][0]), int(hw[1][1])]
        bias_node = [c for c in g.consumers(n.name) if c.op in ("Add", "BiasAdd", "AddV2")]
        if len(bias_node) != 1:
            raise ValueError(f"{n.name}: expected exactly one bias Add consumer")
        b = g.const(bias_node[0].inputs[1])
        convs.append({"name": n.name, "weight": w, "bias": b.reshape(-1), "stride": n.attr_list("strides")[1],
                      "pad": pad})
    return convs


def _pad_layout_is_nchw(g: Graph, pad: Node, conv: Node) -> bool:
    # Walk from the Pad to the conv; a Transpose in between means the Pad saw NCHW data.
    cur = g.node(conv.inputs[0])
    while cur.name != pad.name:
        if cur.op == "Transpose":
            return True
        cur = g.node(cur.inputs[0])
    return False


def _nanodet_names() -> list[str]:
    """Module names of NanoDetBody's convs, in the graph's topological conv order."""
    def stage(name: str, n: int) -> list[str]:
        units = [f"{name}.units.{i}.{j}.conv" for i in range(n) for j in (0, 1)]
        return [f"{name}.entry.conv", *units, f"{name}.transition.conv"]

    return [
        "stem.conv", *stage("stage1", 1), *stage("stage2", 2), "lateral.0.conv", *stage("stage3", 2),
        "lateral.1.conv", *stage("stage4", 3), "lateral.2.conv",
        "head_conv.0.conv", "head_conv.1.conv", "head_out.0", "head_conv.2.conv", "head_out.1", "head_out.2",
    ]


def convert_nanodet(g: Graph) -> dict[str, np.ndarray]:
    convs = nanodet_convs(g)
    names = _nanodet_names()
    if len(convs) != len(names):
        raise ValueError(f"expected {len(names)} convs, graph has {len(convs)}")
    out: dict[str, np.ndarray] = {}
    for name, c in zip(names, convs, strict=True):
        k = c["weight"].shape[0]
        if c["pad"] != [k // 2] * 4:
            raise ValueError(f"{c['name']}: padding {c['pad']} is not symmetric k//2")
        out[f"{name}.weight"] = c["weight"].transpose(3, 2, 0, 1)  # HWIO -> OIHW
        out[f"{name}.bias"] = c["bias"]
    return out


def _conv_weight(g: Graph, n: Node) -> tuple[np.ndarray, np.ndarray | None]:
    w = g.const(n.inputs[1])
    if n.op in ("DepthwiseConv2dNative", "FusedDepthwiseConv2dNative"):
        w = w.transpose(2, 3, 0, 1)  # H W C M -> C M H W  (groups = C, M = 1)
    else:
        w = w.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    b = g.const(n.inputs[2]).reshape(-1) if len(n.inputs) > 2 and g.is_const(n.inputs[2]) else None
    return w, b


def convert_movenet(g: Graph) -> dict[str, np.ndarray]:
    """Map every conv of the MoveNet graph to MoveNetBody names through the graph's node names."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from fluxshard.models.movenet import graph_name_map

    table = graph_name_map()
    out: dict[str, np.ndarray] = {}
    seen = set()
    for n in topo_order(g):
        if "Conv2D" not in n.op and "Depthwise" not in n.op:
            continue
        key = next((k for k in table if n.name.endswith("/" + k)), None)
        if key is None:
            raise ValueError(f"unmapped conv node {n.name}")
        seen.add(key)
        w, b = _conv_weight(g, n)
        out[f"{table[key]}.weight"] = w
        if b is not None:
            out[f"{table[key]}.bias"] = b
    if seen != set(table):
        raise ValueError(f"graph lacks convs for {sorted(set(table) - seen)[:3]}")
    # decoding constants of the graph's post-processing (kept exactly as stored in the graph)
    for n in topo_order(g):
        if n.name.endswith("/truediv_2"):
            out["center_weight"] = g.const(n.inputs[1])[:, :, 0]
        if n.name.endswith("/add_5"):
            out["dist_offset"] = g.const(n.inputs[1]).reshape(())
        if n.name.endswith("/truediv_1"):
            out["input_scale"] = g.const(n.inputs[1]).reshape(-1)[:1].reshape(())
    return out


def save_npz(path: str | Path, arch: str, arrays: dict[str, np.ndarray]) -> None:
    data = {k: (v.astype(np.float16) if v.dtype.kind == "f" else v) for k, v in arrays.items()}
    for k, v in arrays.items():  # the TF.js weights are fp16-quantised: storing fp16 must be lossless
        if v.dtype.kind == "f" and not np.array_equal(data[k].astype(v.dtype), v):
            raise ValueError(f"{k}: not exactly representable in float16")
    np.savez_compressed(path, __model__=np.array(arch), **data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["inspect", "nanodet", "movenet"])
    ap.add_argument("model_json")
    ap.add_argument("out", nargs="?")
    args = ap.parse_args(argv)
    g = load_graph(args.model_json)
    if args.what == "inspect":
        inspect(g)
        return 0
    if not args.out:
        ap.error("OUT is required")
    arrays = convert_nanodet(g) if args.what == "nanodet" else convert_movenet(g)
    save_npz(args.out, args.what, arrays)
    for name, digest in g.sha256.items():
        print(f"sha256 {name} {digest}")
    out_digest = hashlib.sha256(Path(args.out).read_bytes()).hexdigest()
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {len(arrays)} arrays, {size} bytes, sha256 {out_digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
