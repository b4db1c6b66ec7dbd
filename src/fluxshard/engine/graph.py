"""Graph capture and per-node spatial geometry: what every output position depends on in the input image.

The engine never rewrites the user's model. ``torch.fx`` traces the body; shape propagation on a sample
input gives every tensor's size; then each node gets a :class:`Geom` by a spatial rule:

* ``S`` — resolution stride: feature position ``o`` sits at input pixel ``o·S``;
* ``lo``/``hi`` (per axis) — receptive field ``[o·S − lo, o·S + hi]`` in input pixels (conservative);
* ``E`` — equivariance stride: the node's output is translation-equivariant only for input shifts that are
  multiples of ``E`` (the largest stride on any path into it — an FPN feature at stride 8 that mixes an
  up-sampled stride-32 map is only equivariant to 32-pixel shifts);
* ``barrier`` — the output at a position depends on the whole map (global pooling, attention, reshapes
  across space, unknown ops): such nodes are always computed densely and make everything downstream
  reusable only under zero motion and no change at all.

Rules: convolution / pooling (kernel, stride, padding, dilation; groups don't matter spatially), nearest and
bilinear up-sampling, pointwise ops (activations, add/mul/… with broadcasting), channel concat / split /
slicing. Anything else is a barrier and is reported by name.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

BIG = 1 << 30  # "whole image" receptive field / equivariance


@dataclass(frozen=True)
class Geom:
    S: int = 1
    E: int = 1
    lo_y: int = 0
    hi_y: int = 0
    lo_x: int = 0
    hi_x: int = 0
    barrier: bool = False

    def key(self) -> tuple[int, ...]:
        return (self.S, self.E, self.lo_y, self.hi_y, self.lo_x, self.hi_x, int(self.barrier))


_POINTWISE_FUNCS = {
    F.relu, F.relu6, F.leaky_relu, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.elu, F.mish, F.sigmoid,
    F.tanh, torch.relu, torch.sigmoid, torch.tanh, torch.clamp, torch.add, torch.mul, torch.sub, torch.div,
    operator.add, operator.mul, operator.sub, operator.truediv, operator.neg, torch.neg, torch.exp,
    F.softplus, torch.abs, operator.abs,
}
_POINTWISE_METHODS = {
    "relu", "sigmoid", "tanh", "clamp", "add", "mul", "sub", "div", "neg", "exp", "abs", "float", "contiguous",
    "clone", "to", "type_as", "sigmoid_", "relu_", "add_", "mul_",
}
_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.ELU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Identity, nn.BatchNorm2d, nn.Dropout, nn.Softplus,
)
_CHANNEL_FUNCS = {torch.cat, torch.concat, torch.chunk, torch.split}
_aten = torch.ops.aten
_POINTWISE_FUNCS |= {
    _aten.silu.default, _aten.relu.default, _aten.sigmoid.default, _aten.leaky_relu.default, _aten.add.Tensor,
    _aten.mul.Tensor, _aten.sub.Tensor, _aten.div.Tensor, _aten.hardswish.default, _aten.clone.default,
    _aten._to_copy.default, _aten.hardtanh.default, _aten.gelu.default, _aten.tanh.default,
}
_CHANNEL_FUNCS |= {_aten.cat.default, _aten.split.Tensor, _aten.split_with_sizes.default}
_CHANNEL_METHODS = {"chunk", "split"}


@dataclass
class GraphInfo:
    gm: fx.GraphModule
    geoms: dict[str, Geom]
    shapes: dict[str, tuple[int, ...]]
    barriers: list[str] = field(default_factory=list)  # human-readable "node: op" entries
    # How a change at the input of each node spreads to its output (used by fast mode):
    # ("window", k, s, p, d) | ("resample", mode) | ("pointwise",) | ("barrier",) | ("input",)
    ops: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    convs: list[str] = field(default_factory=list)  # names of Conv2d call_module nodes, in order


def tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []

    def visit(a: Any) -> None:
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)

    visit(node.args)
    visit(node.kwargs)
    return out


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[-1])
    return int(v), int(v)


def _window(g: Geom, k: tuple[int, int], s: tuple[int, int], p: tuple[int, int], d: tuple[int, int]) -> Geom:
    if s[0] != s[1]:
        return Geom(barrier=True, S=g.S, E=BIG, lo_y=BIG, hi_y=BIG, lo_x=BIG, hi_x=BIG)
    S2 = g.S * s[0]
    return Geom(
        S=S2,
        E=max(g.E, S2),
        lo_y=g.lo_y + p[0] * g.S,
        hi_y=g.hi_y + ((k[0] - 1) * d[0] - p[0]) * g.S,
        lo_x=g.lo_x + p[1] * g.S,
        hi_x=g.hi_x + ((k[1] - 1) * d[1] - p[1]) * g.S,
        barrier=g.barrier,
    )


def _union(gs: list[Geom]) -> Geom:
    if not gs:
        return Geom()
    S = max(g.S for g in gs)
    same = all(g.S == S for g in gs)
    return Geom(
        S=S,
        E=max(g.E for g in gs) if same else BIG,
        lo_y=max(g.lo_y for g in gs),
        hi_y=max(g.hi_y for g in gs),
        lo_x=max(g.lo_x for g in gs),
        hi_x=max(g.hi_x for g in gs),
        barrier=any(g.barrier for g in gs) or not same,
    )


def _barrier() -> Geom:
    return Geom(S=1, E=BIG, lo_y=BIG, hi_y=BIG, lo_x=BIG, hi_x=BIG, barrier=True)


def _resample(g: Geom, in_hw: tuple[int, int], out_hw: tuple[int, int], mode: str) -> Geom:
    fy, fx_ = out_hw[0] / in_hw[0], out_hw[1] / in_hw[1]
    if fy != fx_ or fy < 1 or fy != int(fy) or g.S % int(fy):
        return _barrier()
    f = int(fy)
    S2 = g.S // f
    if mode == "nearest":  # o reads floor(o / f)
        return Geom(S2, g.E, g.lo_y + (f - 1) * S2, g.hi_y, g.lo_x + (f - 1) * S2, g.hi_x, g.barrier)
    # bilinear / bicubic, half-pixel centres: o reads input pixels within about one pixel of o / f
    r = g.S * (2 if mode == "bicubic" else 1)
    return Geom(S2, g.E, g.lo_y + r, g.hi_y + r, g.lo_x + r, g.hi_x + r, g.barrier)


def trace(body: nn.Module, example: torch.Tensor) -> GraphInfo:
    """Capture ``body`` and compute every node's spatial geometry.

    Symbolic ``torch.fx`` first (module-level graph: convolutions stay ``nn.Conv2d`` modules). Bodies whose
    Python defeats symbolic tracing (ultralytics blocks unpack ``x.shape`` and build lists from ``chunk``)
    are captured shape-specialised at the ATen level with ``make_fx``, and their ``aten.convolution`` nodes
    are lifted back into ``nn.Conv2d`` modules sharing the same weights.
    """
    try:
        gm = fx.symbolic_trace(body)
    except Exception as sym_exc:  # fx raises many types; fall back to a shape-specialised capture
        try:
            gm = _aten_capture(body, example)
        except Exception as exc:
            raise TypeError(
                f"{type(body).__name__} cannot be captured: torch.fx: {sym_exc}; make_fx: {exc}"
            ) from exc
    ShapeProp(gm).propagate(example)
    info = GraphInfo(gm=gm, geoms={}, shapes={})
    geoms = info.geoms
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, (tuple, list)) and meta and hasattr(meta[0], "shape") and node.op == "call_function" \
                and node.target is _aten.max_pool2d_with_indices.default:
            meta = meta[0]  # (values, indices): the geometry is the values'
        if meta is not None and hasattr(meta, "shape"):
            info.shapes[node.name] = tuple(meta.shape)
        ins = [geoms[a.name] for a in tensor_args(node) if a.name in geoms]
        g = _rule(gm, node, ins, info)
        if g is not None:
            geoms[node.name] = g
            info.ops.setdefault(node.name, ("barrier",) if g.barrier and not any(i.barrier for i in ins)
                                else ("pointwise",))
    return info


def _rule(gm: fx.GraphModule, node: fx.Node, ins: list[Geom], info: GraphInfo) -> Geom | None:
    if node.op == "placeholder":
        info.ops[node.name] = ("input",)
        return Geom()
    if node.op == "output" or node.op == "get_attr":
        return None
    shape = info.shapes.get(node.name)
    if shape is None:  # non-tensor values (sizes, tuples of tensors) pass geometry through
        return _union(ins) if ins else None
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                return _mark(info, node, f"Conv2d padding={m.padding!r}/{m.padding_mode}")
            info.convs.append(node.name)
            info.ops[node.name] = ("window", _pair(m.kernel_size), _pair(m.stride), _pair(m.padding),
                                   _pair(m.dilation))
            return _window(ins[0], m.kernel_size, m.stride, m.padding, m.dilation)  # type: ignore[arg-type]
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            k = _pair(m.kernel_size)
            s_, p_, d_ = _pair(m.stride or m.kernel_size), _pair(m.padding), _pair(getattr(m, "dilation", 1))
            info.ops[node.name] = ("window", k, s_, p_, d_)
            return _window(ins[0], k, s_, p_, d_)
        if isinstance(m, nn.Upsample):
            src = info.shapes[tensor_args(node)[0].name]
            info.ops[node.name] = ("resample", m.mode)
            return _resample(ins[0], src[-2:], shape[-2:], m.mode)
        if isinstance(m, _POINTWISE_MODULES):
            return _union(ins)
        return _mark(info, node, type(m).__name__)
    if node.op == "call_function":
        fn = node.target
        if fn in (F.max_pool2d, F.avg_pool2d, _aten.max_pool2d_with_indices.default, _aten.avg_pool2d.default):
            return _pool_from_args(node, ins, info)
        if fn is _aten._unsafe_index.Tensor or fn is _aten.upsample_nearest2d.vec:
            # make_fx writes nearest up-sampling as an index gather; accepted only for exact integer factors
            # (the parity tests would catch a wrong rule: reuse decisions would no longer be exact)
            src = info.shapes[tensor_args(node)[0].name]
            info.ops[node.name] = ("resample", "nearest")
            return _resample(ins[0], src[-2:], shape[-2:], "nearest")
        if fn is F.interpolate:
            src = info.shapes[tensor_args(node)[0].name]
            mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
            info.ops[node.name] = ("resample", str(mode))
            return _resample(ins[0], src[-2:], shape[-2:], str(mode))
        if fn in _POINTWISE_FUNCS or fn in _CHANNEL_FUNCS:
            return _union(ins)
        if fn is operator.getitem:
            return _getitem(node, ins, info)
        return _mark(info, node, getattr(fn, "__name__", str(fn)))
    if node.op == "call_method":
        if node.target in _POINTWISE_METHODS or node.target in _CHANNEL_METHODS:
            return _union(ins)
        return _mark(info, node, f".{node.target}()")
    return _mark(info, node, node.op)


def _aten_capture(body: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.no_grad():
        gm = make_fx(body)(example)
    conv_op = torch.ops.aten.convolution.default
    for i, node in enumerate(list(gm.graph.nodes)):
        if node.op != "call_function" or node.target is not conv_op:
            continue
        x, w_node, b_node, stride, padding, dilation, transposed, _, groups = node.args
        if transposed or w_node.op != "get_attr" or (b_node is not None and b_node.op != "get_attr"):
            continue
        weight = getattr(gm, str(w_node.target))
        bias = getattr(gm, str(b_node.target)) if b_node is not None else None
        conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), tuple(stride),
                         tuple(padding), tuple(dilation), groups, bias=bias is not None)
        conv.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            conv.bias = nn.Parameter(bias, requires_grad=False)
        name = f"lifted_conv_{i}"
        gm.add_submodule(name, conv)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (x,))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _mark(info: GraphInfo, node: fx.Node, what: str) -> Geom:
    info.barriers.append(f"{node.name}: {what}")
    info.ops[node.name] = ("barrier",)
    return _barrier()


def _pool_from_args(node: fx.Node, ins: list[Geom], info: GraphInfo) -> Geom:
    args = list(node.args) + [None] * 6
    kw = node.kwargs
    k = _pair(kw.get("kernel_size", args[1]))
    s = kw.get("stride", args[2])
    s = _pair(s) if s not in (None, []) else k
    p = _pair(kw.get("padding", args[3] if args[3] is not None else 0))
    is_max = node.target in (F.max_pool2d, _aten.max_pool2d_with_indices.default)
    d = _pair(kw.get("dilation", args[4] if is_max and args[4] is not None else 1))
    ceil = kw.get("ceil_mode", args[5] if is_max else args[4])
    if node.target is _aten.max_pool2d_with_indices.default and ceil is None:
        ceil = False
    if ceil is True:
        return _mark(info, node, "pool with ceil_mode")
    info.ops[node.name] = ("window", k, s, p, d)
    return _window(ins[0], k, s, p, d)


def _getitem(node: fx.Node, ins: list[Geom], info: GraphInfo) -> Geom:
    idx = node.args[1]
    if isinstance(idx, int):  # an element of a tuple/list (split, chunk, multiple outputs)
        return _union(ins)
    if isinstance(idx, tuple):
        # x[:, a:b] (channels) keeps geometry; any restriction of the spatial axes is a barrier
        spatial = idx[2:] if len(idx) > 2 else ()
        if all(isinstance(s, slice) and s == slice(None) for s in spatial) or all(
            s is Ellipsis for s in spatial
        ):
            return _union(ins)
    return _mark(info, node, f"indexing {idx!r}")
