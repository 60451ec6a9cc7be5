"""The adapter skipped where it does not act: the fused denoiser with its adapter branch under an ONNX `If`.

Below the adapter's `from_t` the sampler passes `adapter_weight = 0` (sampling.step_weight), and there
`eps + 0 * delta == eps`, so the adapter's nodes (about 90 small ones on the mini model, the whole of its cost on
ONNX Runtime's two CPU threads) are work thrown away. `gated_graph` rewrites

    out = eps + adapter_weight * delta(x, t, text, eps)
into
    out = If(adapter_weight != 0, then: eps + adapter_weight * delta(...), else: eps)

OpenVINO runs an `If` body slowly (the adapter's 98 nodes cost 2x under the `If` what they cost as a graph of their
own), so for it `split_graph` cuts the same graph in two instead: the base (the whole denoiser at weight 0, which
also outputs eps) for every step, and the side graph (eps -> eps + adapter_weight * delta -> the CFG combine) run
after it only where the weight is not 0.

The exported file is unchanged: the CPU runtimes (ONNX Runtime, OpenVINO) gate or split the graph in memory when
they load it. TensorRT and the CUDA EP keep the ungated graph: a data-dependent `If` cannot be captured in a CUDA
graph. A graph with external data (SD-scale UNets) is neither gated nor split (protobuf cannot hold it in memory),
nor one without an adapter.
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


def _consumers(graph) -> dict:
    consumers: dict = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    return consumers


def _float_value(name: str, rank: int | None = None):
    """An fp32 value (the combine runs in fp32) of unknown dims: shape inference fills them in."""
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None if rank is None else [None] * rank)


def _adapter_combine(graph):
    """(consumers, mul, add, eps) of a fused denoiser's graph (`_combine`), or None when it has no adapter."""
    consumers = _consumers(graph)
    found = _combine(graph, consumers)
    return None if found is None else (consumers, *found)


def gated_graph(model) -> bool:
    """Put the adapter branch of a fused denoiser ModelProto under `If(adapter_weight != 0)`, in place.
    False (and the model untouched) when there is no adapter combine to gate."""
    from onnx import TensorProto, helper

    graph = model.graph
    if (found := _adapter_combine(graph)) is None:
        return False
    consumers, mul, add, eps = found
    branch = _branch_nodes(graph, mul, add, eps, consumers)
    out = add.output[0]
    at = sum(1 for n in graph.node[:list(graph.node).index(add)] if id(n) not in branch)
    inner = [n for n in graph.node if id(n) in branch]
    add.output[0] = f"{out}/adapter_on"
    then_graph = helper.make_graph(inner, "adapter_on", [], [_float_value(add.output[0])])
    else_graph = helper.make_graph([helper.make_node("Identity", [eps], [f"{out}/adapter_off"])], "adapter_off", [],
                                   [_float_value(f"{out}/adapter_off")])
    gate = [helper.make_node("Cast", [WEIGHT], [f"{WEIGHT}/nonzero"], to=TensorProto.BOOL, name="adapter_gate_cond"),
            helper.make_node("If", [f"{WEIGHT}/nonzero"], [out], then_branch=then_graph, else_branch=else_graph,
                             name="adapter_gate")]
    kept = [n for n in graph.node if id(n) not in branch]
    del graph.node[:]
    graph.node.extend(kept[:at] + gate + kept[at:])
    return True


def _side_nodes(graph, eps: str, producers: dict) -> list:
    """The nodes the graph's outputs need once eps is given: the adapter, the combine after it, and the few input
    reshapes (the doubled sample and timestep) the adapter shares with the base."""
    stop = {eps} | {i.name for i in graph.input}
    seen: set[int] = set()
    stack = [o.name for o in graph.output]
    while stack:
        node = producers.get(name := stack.pop())
        if name not in stop and node is not None and id(node) not in seen:
            seen.add(id(node))
            stack.extend(node.input)
    return [n for n in graph.node if id(n) in seen]


SHARED_NODES_MAX = 8  # side-graph nodes the base also runs (input reshapes); more means the adapter reads the UNet


def split_graph(model):
    """(base, side) ModelProtos of a fused denoiser with an adapter, or None (no adapter combine, or an adapter that
    reads the UNet's inner features). base: the graph at weight 0 (no adapter_weight input), outputs noise_pred and
    eps; side: inputs the graph's inputs it reads plus eps, outputs noise_pred = the graph's at any weight."""
    graph = model.graph
    if (found := _adapter_combine(graph)) is None:
        return None
    consumers, mul, add, eps = found
    producers = {o: n for n in graph.node for o in n.output}
    side_nodes = _side_nodes(graph, eps, producers)
    if len({id(n) for n in side_nodes} & _ancestors([eps], producers)) > SHARED_NODES_MAX:
        return None
    base_nodes = _base_nodes(graph, mul, add, eps, consumers)
    if any(WEIGHT in n.input for n in base_nodes):
        return None
    eps_value = _float_value(eps, len(graph.output[0].type.tensor_type.shape.dim))  # eps: the noise_pred's rank
    return _base_model(model, base_nodes, eps_value), _side_model(model, side_nodes, eps_value)


def _base_nodes(graph, mul, add, eps: str, consumers: dict) -> list:
    """The graph's nodes without the adapter branch, its combine `Add` replaced by `Identity(eps)`."""
    from onnx import helper

    branch = _branch_nodes(graph, mul, add, eps, consumers)
    return [helper.make_node("Identity", [eps], [add.output[0]]) if n is add else n
            for n in graph.node if n is add or id(n) not in branch]


def _base_model(model, nodes: list, eps_value):
    from onnx import ModelProto

    base = ModelProto()
    base.CopyFrom(model)
    inputs = [i for i in base.graph.input if i.name != WEIGHT]
    for field, values in ((base.graph.node, nodes), (base.graph.input, inputs)):
        del field[:]
        field.extend(values)
    base.graph.output.append(eps_value)
    _drop_unused_initializers(base.graph)
    return base


def _side_model(model, nodes: list, eps_value):
    from onnx import helper

    graph = model.graph
    reads = {i for n in nodes for i in n.input}
    side = helper.make_graph(nodes, "adapter_side", [i for i in graph.input if i.name in reads] + [eps_value],
                             list(graph.output), initializer=[t for t in graph.initializer if t.name in reads])
    return helper.make_model(side, opset_imports=model.opset_import, ir_version=model.ir_version)


def _drop_unused_initializers(graph) -> None:
    reads = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in reads]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _adapter_source(path: str | Path, spec):
    """The loaded ModelProto of a denoiser with an adapter that a CPU runtime may rewrite, else None (text encoder,
    VAE, a base export, external data: an SD-scale UNet, which protobuf cannot hold in memory)."""
    import onnx

    from .onnx_export import external_data_path

    if WEIGHT not in {t.name for t in spec.inputs} or external_data_path(path).exists():
        return None
    return onnx.load(str(path))


def cpu_model_parts(path: str | Path, spec) -> tuple[bytes, bytes] | None:
    """What OpenVINO loads for a denoiser with an adapter: the serialized (base, side) of `split_graph`, else None
    (load the file itself)."""
    model = _adapter_source(path, spec)
    parts = split_graph(model) if model is not None else None
    return None if parts is None else (parts[0].SerializeToString(), parts[1].SerializeToString())


def cpu_model_source(path: str | Path, spec) -> str | bytes:
    """What ONNX Runtime loads for the component at `path`: the serialized gated graph for a denoiser with an
    adapter, else the path itself."""
    model = _adapter_source(path, spec)
    return model.SerializeToString() if model is not None and gated_graph(model) else str(path)
