"""TensorRT runtime: verified engines from the cache, torch CUDA buffers bound once per shape, optional CUDA graphs.

Every call enqueues on torch's current CUDA stream (`execute_async_v3`), so engine calls and the scheduler's torch
ops stay ordered without any host synchronisation inside the denoising loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from ...errors import InvdiffError
from ...export import tensorrt as trt_export
from ...export.manifest import adapter_from_t
from ...models.loader import tokenize


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64,
             trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


class EngineRunner:
    """One engine + execution context; buffers (and a CUDA graph) per distinct input-shape signature."""

    def __init__(self, plan: str | Path, use_cuda_graph: bool = True):
        import tensorrt as trt

        self.trt = trt
        self.plan = Path(plan)
        self.engine = trt_export.load_engine(plan)
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.use_cuda_graph = use_cuda_graph
        self._bindings: dict[tuple, dict[str, Any]] = {}
        self._graphs: dict[tuple, Any] = {}
        self._active: tuple | None = None

    def _allocate(self, shapes: Mapping[str, tuple]) -> dict[str, Any]:
        """Allocate every I/O buffer for one input-shape signature and bind its address."""
        import torch

        for name in self.inputs:
            if not self.context.set_input_shape(name, shapes[name]):
                raise InvdiffError(f"{self.plan}: input {name} shape {shapes[name]} is outside the engine's "
                                   "optimisation profile; rebuild with a larger batch range")
        buffers = {}
        for name in self.inputs + self.outputs:
            shape = tuple(shapes[name]) if name in shapes else tuple(self.context.get_tensor_shape(name))
            dtype = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            buffers[name] = torch.empty(shape, dtype=dtype, device="cuda")
        return buffers

    def bind(self, signature: tuple, shapes: Mapping[str, tuple]) -> dict[str, Any]:
        """Buffers for one input-shape signature (allocated once), bound to the context."""
        if signature not in self._bindings:
            self._bindings[signature] = self._allocate(shapes)
        buffers = self._bindings[signature]
        if self._active != signature:  # shapes and addresses are context state: rebind on a shape switch
            for name, buf in buffers.items():
                if name in self.inputs:
                    self.context.set_input_shape(name, tuple(buf.shape))
                self.context.set_tensor_address(name, buf.data_ptr())
            self._active = signature
        return buffers

    def _enqueue(self) -> None:
        import torch

        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise InvdiffError(f"{self.plan}: TensorRT execution failed; rebuild the engine with `invdiff build`")

    def __call__(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run on {input name: tensor}; returns the output buffers (valid until the next call)."""
        import torch

        missing = [name for name in self.inputs if name not in feeds]
        if missing:
            raise InvdiffError(f"{self.plan}: missing engine inputs {missing}; rebuild the engine from this export")
        args = [feeds[name] for name in self.inputs]
        shapes = {name: tuple(x.shape) for name, x in zip(self.inputs, args)}
        signature = tuple(shapes.values())
        buffers = self.bind(signature, shapes)
        for name, x in zip(self.inputs, args):
            buffers[name].copy_(x, non_blocking=True)
        if not self.use_cuda_graph:
            self._enqueue()
        elif signature in self._graphs:
            self._graphs[signature].replay()
        else:
            self._enqueue()  # first run at this shape: lets TensorRT settle shape-dependent state before capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._enqueue()
            self._graphs[signature] = graph
        return {name: buffers[name] for name in self.outputs}


class TrtRuntime:
    """The `Runtime` protocol on TensorRT engines: encode_text, denoise_step (fused UNet+adapter+CFG), decode."""

    name = "tensorrt"

    def __init__(self, plans: Mapping[str, Path], manifest: Mapping[str, Any], tokenizer=None,
                 use_cuda_graph: bool = True):
        import torch

        self.manifest = dict(manifest)
        self.runners = {name: EngineRunner(plan, use_cuda_graph) for name, plan in plans.items()}
        self.tokenizer = tokenizer
        self.device = torch.device("cuda")
        self.cfg = "guidance_scale" in self.runners["denoiser"].inputs
        self.latent_shape = _latent_shape(manifest)
        self.scheduler_config = manifest.get("scheduler_config")
        self.adapter_from_t = adapter_from_t(self.manifest)  # sampling.step_weight

    @classmethod
    def from_export(cls, export_dir: str | Path, engines_dir: str | Path = "engines", use_cuda_graph: bool = True,
                    refit_mode: str = "individual", builder_optimization_level: int = 3,
                    adapter_dir: str | Path | None = None) -> "TrtRuntime":
        """Load the cached engines of an export folder (the denoiser refitted with `adapter_dir` when given); a
        missing or stale engine is an error, never loaded."""
        trt = trt_export.require_tensorrt(trt_export.BACKEND_USER)
        export_dir = Path(export_dir)
        manifest = trt_export.read_export_manifest(export_dir)
        plans = trt_export.engine_plans(export_dir, engines_dir, trt.__version__, trt_export.gpu_identity(),
                                        refit_mode, builder_optimization_level, adapter_dir)
        if adapter_dir is not None:
            manifest = trt_export.refitted_manifest(manifest, adapter_dir)
        return cls(plans, manifest, tokenizer=_tokenizer(export_dir), use_cuda_graph=use_cuda_graph)

    def prepare(self, batch: int) -> None:
        """Allocate the denoiser's buffers for `batch` up front, with the shapes declared in the export spec."""
        from ...export.spec import ExportSpec

        runner = self.runners["denoiser"]
        spec = ExportSpec.from_json(self.manifest["components"]["denoiser"]["spec"])
        shapes = spec.shapes(batch, tuple(d * spec.downsample for d in self.latent_shape[1:]))
        runner.bind(tuple(shapes[name] for name in runner.inputs), shapes)

    def denoise_step(self, sample, timestep, text_embeddings, guidance_scale, adapter_weight):
        """noise_pred[B] = fused engine(sample[B], timestep[B], text[2B] (cond, uncond), s[], w[]); no host sync."""
        import torch

        f32 = dict(device=self.device, dtype=torch.float32)
        feeds = {"sample": sample, "timestep": timestep.to(**f32).reshape(-1).expand(sample.shape[0]),
                 "text_embeddings": text_embeddings, "guidance_scale": torch.as_tensor(guidance_scale, **f32),
                 "adapter_weight": torch.as_tensor(adapter_weight, **f32)}
        return _only(self.runners["denoiser"](feeds)).clone()

    def encode_text(self, prompts: Sequence[str]):
        if self.tokenizer is None:
            raise InvdiffError("export folder: no tokenizer/ inside it; re-run `invdiff export`")
        ids = tokenize(self.tokenizer, prompts)
        return _only(self.runners["text_encoder"]({"input_ids": ids.to(self.device)})).clone()

    def decode(self, latents):
        return _only(self.runners["vae_decoder"]({"latents": latents})).float().clone()


def _only(outputs: Mapping[str, Any]):
    (value,) = outputs.values()
    return value


def _latent_shape(manifest: Mapping[str, Any]) -> tuple[int, ...]:
    """(C, h, w) from the denoiser spec's `sample` input (shapes are declared only in the export spec)."""
    from ...export.spec import ExportSpec

    spec = ExportSpec.from_json(manifest["components"]["denoiser"]["spec"])
    return tuple(int(d) for d in spec.shapes(1)["sample"][1:])  # the opt size of a resolution range


def _tokenizer(export_dir: Path):
    path = export_dir / "tokenizer"
    if not path.is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load(export_dir: str | Path, engines_dir: str | Path = "engines", **kwargs) -> TrtRuntime:
    return TrtRuntime.from_export(export_dir, engines_dir, **kwargs)
