"""The adapter skipped where it does not act: the fused denoiser with its adapter branch under an ONNX `If`.

Below the adapter's `from_t` the sampler passes `adapter_weight = 0` (sampling.step_weight), and there
`eps + 0 * delta == eps`, so the adapter's nodes (about 90 small ones on the mini model, the whole of its cost on
ONNX Runtime's two CPU threads) are work thrown away. `gated_graph` rewrites

    out = eps + adapter_weight * delta(x, t, text, eps)
into
    out = If(adapter_weight != 0, then: eps + adapter_weight * delta(...), else: eps)

The exported file is unchanged: the CPU runtimes (ONNX Runtime, OpenVINO) gate the graph in memory when they load
it. TensorRT and the CUDA EP keep the ungated graph: a data-dependent `If` cannot be captured in a CUDA graph. A
graph with external data (SD-scale UNets) is not gated either (protobuf cannot hold it in memory), nor one without
an adapter.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

WEIGHT = "adapter_weight"


def _ancestors(names: list[str], producers: dict) -> set[int]:
    """ids of the nodes that `names` depend on (producers included)."""
    seen: set[int] = set()
    stack = list(names)
    while stack:
        node = producers.get(stack.pop())
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            stack.extend(node.input)
    return seen


def _combine(graph, consumers: dict):
    """(mul, add, eps): the `Mul(adapter_weight, delta)` and the `Add(eps, mul)` that FusedDenoiser exports, or
    None when the graph has no such pattern (no adapter)."""
    muls = [n for n in consumers[WEIGHT] if n.op_type == "Mul"]
    adds = [c for c in consumers[muls[0].output[0]] if c.op_type == "Add"] if len(muls) == 1 else []
    if len(adds) != 1:
        return None
    eps = [i for i in adds[0].input if i != muls[0].output[0]]
    return (muls[0], adds[0], eps[0]) if len(eps) == 1 else None


def _branch_nodes(graph, mul, add, eps: str, consumers: dict) -> set[int]:
    """The nodes only the adapter's output needs: ancestors of delta that the base (eps) does not need, minus any
    whose outputs are also read outside the branch or are graph outputs."""
    producers = {o: n for n in graph.node for o in n.output}
    delta = next(i for i in mul.input if i != WEIGHT)
    branch = (_ancestors([delta], producers) - _ancestors([eps], producers)) | {id(mul), id(add)}
    outputs = {o.name for o in graph.output}
    while leaks := {id(n) for n in graph.node if id(n) in branch and n is not add and any(
            o in outputs or any(id(c) not in branch for c in consumers[o]) for o in n.output)}:
        branch -= leaks
    return branch


def gated_graph(model) -> bool:
    """Put the adapter branch of a fused denoiser ModelProto under `If(adapter_weight != 0)`, in place.
    False (and the model untouched) when there is no adapter combine to gate."""
    from onnx import TensorProto, helper

    graph = model.graph
    consumers: dict = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    found = _combine(graph, consumers)
    if found is None:
        return False
    mul, add, eps = found
    branch = _branch_nodes(graph, mul, add, eps, consumers)
    out = add.output[0]
    at = sum(1 for n in graph.node[:list(graph.node).index(add)] if id(n) not in branch)
    inner = [n for n in graph.node if id(n) in branch]
    add.output[0] = f"{out}/adapter_on"
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)  # noqa: E731 (fp32 combine)
    then_graph = helper.make_graph(inner, "adapter_on", [], [value(add.output[0])])
    else_graph = helper.make_graph([helper.make_node("Identity", [eps], [f"{out}/adapter_off"])], "adapter_off", [],
                                   [value(f"{out}/adapter_off")])
    gate = [helper.make_node("Cast", [WEIGHT], [f"{WEIGHT}/nonzero"], to=TensorProto.BOOL, name="adapter_gate_cond"),
            helper.make_node("If", [f"{WEIGHT}/nonzero"], [out], then_branch=then_graph, else_branch=else_graph,
                             name="adapter_gate")]
    kept = [n for n in graph.node if id(n) not in branch]
    del graph.node[:]
    graph.node.extend(kept[:at] + gate + kept[at:])
    return True


def cpu_model_source(path: str | Path, spec) -> str | bytes:
    """What a CPU runtime loads for the component at `path`: the serialized gated graph for a denoiser with an
    adapter, else the path itself (text encoder, VAE, a base export, external data: an SD-scale UNet)."""
    import onnx

    from .onnx_export import external_data_path

    if WEIGHT not in {t.name for t in spec.inputs} or external_data_path(path).exists():
        return str(path)
    model = onnx.load(str(path))
    return model.SerializeToString() if gated_graph(model) else str(path)
