"""OpenVINO backend (CPU): the `Runtime` protocol over the same export folder as ONNX Runtime.

OpenVINO reads our fused ONNX graphs directly. Each component is compiled once per input-shape set, reshaped to
static shapes first (shape specialisation: the CPU plugin picks better kernels for static shapes than for dynamic
ones). A batch is split into one chunk per stream (`streams`, default: the CPU threads), and the chunks run
concurrently, one single-threaded infer request each: the tiny kernels of a small latent UNet scale badly across
threads inside one op (every op ends in a barrier, which a busy neighbour turns into waiting), but independent
chunks do not wait for each other. A batch of one runs on one stream, one thread. Chunks follow the spec's batch
symbols (`2B` inputs keep their cond and uncond rows together), so a chunk computes exactly the rows it would compute
in the whole batch. Precision is pinned: `fp32` sets INFERENCE_PRECISION_HINT=f32, because on AMX/avx512_bf16 CPUs
OpenVINO otherwise runs bf16 by default, which is lossy; `bf16` (opt-in) lets it use bf16 kernels. The denoiser with
an adapter is compiled as two graphs cut from the fused one (export/gate.py `split_graph`): the base denoiser, which
every step runs, and the adapter's side graph (eps -> eps + w * delta -> the CFG combine), which runs after it only
where the adapter weight is not 0. Measured per step against the base export's (one thread, in-process, min of 20
calls, 10 interleaved rounds): the acting step 1.08x at 2 and 16 rows, where the fused graph with the adapter under
an `If` (what ONNX Runtime runs) took 1.12x (OpenVINO runs the `If` body at half the speed of the same nodes as a
graph of their own). Compiling a second whole denoiser for the acting steps instead (the ungated graph, tried) cost
about a step more at each switch between the two (the other graph's weights and stream thread come back cold); the
side graph is small (44k weights) and costs nothing to switch to.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...errors import InvdiffError
from ...export.gate import WEIGHT, cpu_model_parts
from ...export.manifest import component_spec, read_manifest
from .onnxruntime_backend import ExportRuntime, _numpy, _tokenizer

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}


def compile_config(streams: int, precision: str = "fp32") -> dict[str, str]:
    """CPU plugin properties: `streams` streams of one thread each, pinned inference precision, threads not
    pinned to cores (on a shared machine a pinned thread waits for its busy core instead of moving)."""
    if precision not in PRECISION_HINTS:
        raise InvdiffError(f"--precision {precision}: the openvino backend runs fp32 or bf16")
    return {"NUM_STREAMS": str(streams), "INFERENCE_NUM_THREADS": str(streams), "ENABLE_CPU_PINNING": "NO",
            "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision]}


def default_streams(threads: int | None) -> int:
    import os

    return max(1, int(threads) if threads else len(os.sched_getaffinity(0)))


def chunk_bounds(batch: int, chunks: int) -> list[tuple[int, int]]:
    """[start, stop) of `chunks` near-equal, non-empty slices of range(batch) (fewer when batch < chunks)."""
    chunks = max(1, min(chunks, batch))
    edges = [round(i * batch / chunks) for i in range(chunks + 1)]
    return list(zip(edges[:-1], edges[1:]))


def take_rows(x: np.ndarray, dims: tuple, batch: int, start: int, stop: int, rows: int = 0) -> np.ndarray:
    """Rows [start, stop) of every batch half: dim 0 `B` -> x[start:stop]; `2B` -> both halves' rows; static: x.
    With `rows`, each half is padded to that many by repeating its last row (`unpad` drops them)."""
    if not dims or dims[0] not in ("B", "2B"):
        return x
    halves = [x[start:stop]] if dims[0] == "B" else [x[start:stop], x[batch + start:batch + stop]]
    return np.concatenate([np.concatenate([h, np.repeat(h[-1:], rows - len(h), axis=0)]) if len(h) < rows else h
                           for h in halves])


def unpad(y: np.ndarray, dims: tuple, keep: int) -> np.ndarray:
    """The first `keep` rows of every batch half of an output (what `take_rows` padded)."""
    halves = np.split(y, 2) if dims[0] == "2B" else [y]
    return np.concatenate([h[:keep] for h in halves])


def put_rows(parts: list[np.ndarray], dims: tuple) -> np.ndarray:
    """Inverse of take_rows over all chunks, for an output."""
    if dims[0] == "2B":
        halves = [np.split(p, 2) for p in parts]
        return np.concatenate([h[0] for h in halves] + [h[1] for h in halves])
    return np.concatenate(parts)


class OvGraph:
    """One graph read by OpenVINO and its compiled programs: one per set of chunk shapes, compiled on first use with
    one stream per chunk, each chunk on its own bound request."""

    def __init__(self, core, source: str | bytes, precision: str):
        self.core, self.precision = core, precision
        self.model = core.read_model(source)
        self.compiled: dict[tuple, list["BoundRequest"]] = {}

    def requests(self, chunks: list[dict[str, np.ndarray]]) -> list["BoundRequest"]:
        key = tuple(tuple((name, chunk[name].shape) for name in sorted(chunk)) for chunk in chunks)
        if key not in self.compiled:
            reshaped = self.model.clone()
            reshaped.reshape({p.get_any_name(): list(chunks[0][p.get_any_name()].shape) for p in self.model.inputs})
            program = self.core.compile_model(reshaped, "CPU", compile_config(len(chunks), self.precision))
            self.compiled[key] = [BoundRequest(program.create_infer_request(), chunk) for chunk in chunks]
        return self.compiled[key]


class OvComponent:
    """One ONNX graph + its spec: `__call__(**inputs)` -> first output as a torch tensor (a copy)."""

    def __init__(self, core, source: str | bytes, spec, streams: int, precision: str):
        self.spec, self.streams = spec, streams
        self.graph = OvGraph(core, source, precision)
        self.input_names = [p.get_any_name() for p in self.graph.model.inputs]
        self.feed_names = self.input_names  # what a call reads
        self.dims = {t.name: t.dims for t in spec.inputs}

    def __call__(self, **inputs) -> torch.Tensor:
        arrays = {name: _numpy(inputs[name], self.spec.dtype(name)) for name in self.feed_names}
        batch = self.batch_of(arrays)
        bounds = chunk_bounds(batch, self.streams)
        if len(bounds) == 1:
            return torch.from_numpy(self.run([arrays])[0])
        # chunks of one shape (one compile, every stream): a shorter one is padded (batch 7 on 2 streams ran as one
        # stream of one thread, 1.7x slower a row than batch 8)
        rows, dims = max(stop - start for start, stop in bounds), self.spec.outputs[0].dims
        chunks = [{n: take_rows(a, self.dims[n], batch, *b, rows) for n, a in arrays.items()} for b in bounds]
        outputs = [unpad(y, dims, stop - start) for y, (start, stop) in zip(self.run(chunks), bounds)]
        return torch.from_numpy(put_rows(outputs, dims))

    def run(self, chunks: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        return dispatch(self.graph.requests(chunks), chunks)

    def batch_of(self, arrays: dict[str, np.ndarray]) -> int:
        first = self.spec.inputs[0]
        size = arrays[first.name].shape[0]
        return size // 2 if first.dims[0] == "2B" else size


def dispatch(reqs: list["BoundRequest"], chunks: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """One chunk runs synchronously on its request; several run concurrently, one request each."""
    if len(reqs) == 1:
        return [reqs[0].infer(chunks[0])]
    for req, chunk in zip(reqs, chunks):
        req.start(chunk)
    return [req.result() for req in reqs]


class OvSplitDenoiser(OvComponent):
    """The denoiser with an adapter as `split_graph`'s two graphs: the base on every call; where adapter_weight is
    not 0, the side graph after it, on the base's eps (each chunk's rows stay on that chunk's requests)."""

    def __init__(self, core, parts: tuple[bytes, bytes], spec, streams: int, precision: str):
        super().__init__(core, parts[0], spec, streams, precision)
        self.side = OvGraph(core, parts[1], precision)
        self.eps = self.side.model.inputs[-1].get_any_name()  # split_graph: the side graph's last input
        self.feed_names = self.input_names + [WEIGHT]

    def run(self, chunks: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        base = [{name: chunk[name] for name in self.input_names} for chunk in chunks]
        reqs = self.graph.requests(base)
        outputs = dispatch(reqs, base)
        if not np.any(chunks[0][WEIGHT]):
            return outputs
        sides = [chunk | {self.eps: req.request.get_output_tensor(1).data} for chunk, req in zip(chunks, reqs)]
        return dispatch(self.side.requests(sides), sides)


def component(core, path: Path, spec, streams: int, precision: str) -> OvComponent:
    """The component at `path`: split in two for a denoiser with an adapter (export/gate.py), else as it is."""
    parts = cpu_model_parts(path, spec)
    if parts is None:
        return OvComponent(core, str(path), spec, streams, precision)
    return OvSplitDenoiser(core, parts, spec, streams, precision)


class BoundRequest:
    """An infer request whose inputs are bound once to numpy buffers (shared with OpenVINO); a call copies the
    chunk into them. Measured at batch 1: 0.14 ms of a 1.26 ms step went to converting and setting the inputs on
    every call (the data dispatcher of `start_async(inputs)`); the output is copied out before the next call."""

    def __init__(self, request, chunk: dict[str, np.ndarray]):
        import openvino as ov

        self.request = request
        self.buffers = {name: np.array(value, copy=True) for name, value in chunk.items()}
        for name, buffer in self.buffers.items():
            request.set_tensor(name, ov.Tensor(buffer, shared_memory=True))

    def load(self, chunk: dict[str, np.ndarray]) -> None:
        for name, value in chunk.items():
            np.copyto(self.buffers[name], value)

    def infer(self, chunk: dict[str, np.ndarray]) -> np.ndarray:
        self.load(chunk)
        self.request.infer()
        return self.request.get_output_tensor(0).data.copy()

    def start(self, chunk: dict[str, np.ndarray]) -> None:
        self.load(chunk)
        self.request.start_async()

    def result(self) -> np.ndarray:
        self.request.wait()
        return self.request.get_output_tensor(0).data.copy()


class OvRuntime(ExportRuntime):
    """The `Runtime` protocol on OpenVINO CPU compiled models built from an export folder alone."""

    name = "openvino"

    def __init__(self, export_dir: str | Path, threads: int | None = None, precision: str = "fp32",
                 verify: bool = True):
        import openvino as ov

        export_dir = Path(export_dir)
        self.manifest = read_manifest(export_dir, verify=verify)
        if self.manifest.get("precision", "fp32") != "fp32":
            raise InvdiffError(f"--export {export_dir}: the openvino backend needs an fp32 export (bf16 is a "
                               "compile option: --precision bf16); re-run `invdiff export --precision fp32`")
        self.device = torch.device("cpu")
        self.cfg = bool(self.manifest.get("cfg", True))
        # fp32/fp16 name an export's precision (the export decides, as on onnxruntime); only bf16 changes kernels
        self.precision = precision = "bf16" if precision == "bf16" else "fp32"
        self.latent_shape = tuple(self.manifest["latent_shape"])
        self.scheduler_config = self.manifest["scheduler_config"]
        core, streams = ov.Core(), default_streams(threads)
        compile_config(streams, precision)  # refuses an unknown precision before anything compiles
        self.components = {name: component(core, export_dir / entry["file"], component_spec(self.manifest, name),
                                           streams, precision)
                           for name, entry in self.manifest["components"].items()}
        self.tokenizer = _tokenizer(export_dir)
