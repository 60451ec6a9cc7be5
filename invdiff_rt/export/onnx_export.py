"""torch -> ONNX for one component: dynamo export (opset >= 18), Polygraphy constant folding that leaves the
adapter's weights as named initializers (TensorRT refit targets them), and symbolic batch dims renamed to the spec's.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import torch

from ..errors import InvdiffError
from .fp16 import keep_fragile_ops_fp32
from .spec import PRECISIONS, ExportSpec

EXPORT_BATCH = 2  # trace batch; must not be 1 (the exporter would specialise a size-1 dim)
MIN_OPSET = 18  # the dynamo exporter's minimum; opset 17 down-conversion leaves invalid Split nodes
EXTERNAL_DATA_BYTES = 2**31 - 2**26  # protobuf's 2 GB limit, with headroom for the graph itself
LARGE_BYTES = 2**29  # above 512 MiB of weights: `export_large` (no in-memory copies; measured on SD 1.5, issue 13)


# ---------------------------------------------------------------------------------------------------------------
# exportable modules: forward arguments named exactly like the spec's inputs


class DenoiserModule(torch.nn.Module):
    """FusedDenoiser with the spec's input names (guidance_scale and adapter_weight are runtime inputs).

    `adapter_params` (export only) feeds the adapter's weights as graph inputs, so no exporter pass can fold
    them; they become named initializers afterwards (`weights_to_initializers`).
    """

    def __init__(self, fused: torch.nn.Module):
        super().__init__()
        self.fused = fused

    def forward(self, sample, timestep, text_embeddings, guidance_scale, adapter_weight, adapter_params=None):
        return self._fused(adapter_params)(sample, timestep, text_embeddings, guidance_scale, adapter_weight)

    def _fused(self, adapter_params):
        if not adapter_params:
            return self.fused
        params = {f"adapter.{k}": v for k, v in adapter_params.items()}
        return lambda *args: torch.func.functional_call(self.fused, params, args)


class NoCfgDenoiserModule(DenoiserModule):
    """The guidance_scale == 1 variant: no uncond half, no guidance_scale input."""

    def forward(self, sample, timestep, text_embeddings, adapter_weight, adapter_params=None):
        scale = torch.ones_like(adapter_weight)
        return self._fused(adapter_params)(sample, timestep, text_embeddings, scale, adapter_weight)


class TextEncoderModule(torch.nn.Module):
    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids)[0]


class VaeDecoderModule(torch.nn.Module):
    """Scaled latents -> images in [0, 1] (unscale, decode, map from [-1, 1]; the output is float32)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae
        self.scale = 1.0 / float(vae.config.scaling_factor)

    def forward(self, latents):
        x = self.vae.decode(latents * self.scale).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)


def component_module(component: str, model, adapter=None, cfg: bool = True, precision: str = "fp32",
                     copy_weights: bool = True):
    """A frozen copy of one component in the export precision (the loaded model is left untouched).
    `copy_weights=False` (a caller that owns the model, e.g. an SD-scale export) converts in place instead of
    holding a second copy of the weights."""
    dtype = getattr(torch, PRECISIONS[precision])

    def copy_as(module, islands: bool = True):  # `.to(float32)` on a float32 diffusers model only logs a warning
        module = copy.deepcopy(module) if copy_weights else module
        if dtype == torch.float32:
            return module
        module = module.to(dtype)
        return keep_fragile_ops_fp32(module, dtype) if islands else module

    if component == "denoiser":
        from ..runtime.fused import FusedDenoiser

        unet = copy_as(model.unet)
        adapter = copy_as(adapter, islands=False) if adapter is not None else None
        module = (DenoiserModule if cfg else NoCfgDenoiserModule)(FusedDenoiser(unet, adapter, cfg=cfg))
    elif component == "text_encoder":
        module = TextEncoderModule(copy_as(model.text_encoder))
    elif component == "vae_decoder":
        module = VaeDecoderModule(copy_as(model.vae))
    else:
        raise ValueError(f"unknown component {component!r}")
    return module.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# export + clean-up


def torch_to_onnx(module: torch.nn.Module, spec: ExportSpec, opset: int = MIN_OPSET,
                  weights: dict[str, torch.Tensor] | None = None):
    """Dynamo export with every spec'd batch dim dynamic; `weights` (the adapter's) become extra graph inputs
    named `adapter.<state_dict name>`. Returns the onnx.ModelProto (weights loaded in memory)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{spec.component}.onnx"
        write_torch_export(module, spec, path, opset, weights)
        return onnx.load(str(path))  # pulls any external data into memory


def write_torch_export(module: torch.nn.Module, spec: ExportSpec, path: Path, opset: int = MIN_OPSET,
                       weights: dict[str, torch.Tensor] | None = None) -> None:
    """The dynamo export itself, written to `path` (+ `path.data`, external data)."""
    if opset < MIN_OPSET:
        raise InvdiffError(f"--opset {opset}: the exporter needs opset >= {MIN_OPSET}; pass --opset 18")
    args = tuple(spec.sample_inputs(EXPORT_BATCH, size=spec.trace_size()).values())
    dynamic = spec.dynamic_shapes()
    kwargs, names = {}, list(spec.input_names)
    if weights:
        kwargs = {"adapter_params": dict(weights)}
        dynamic["adapter_params"] = {k: None for k in weights}
        names += [weight_input_name(k) for k in weights]
    with warnings.catch_warnings(), quiet_loggers("torch.onnx"):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), kwargs=kwargs, dynamo=True, opset_version=opset,
                          input_names=names, output_names=spec.output_names, dynamic_shapes=dynamic,
                          external_data=True, optimize=True, verbose=False)


def weight_input_name(state_name: str) -> str:
    return f"adapter.{state_name}"


def fold(model):
    """Polygraphy constant folding (graph inputs, hence the adapter weights, are never folded)."""
    from polygraphy.backend.onnx import fold_constants
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.WARNING), quiet_loggers("onnxruntime.tools.symbolic_shape_infer"):
        return fold_constants(model, allow_onnxruntime_shape_inference=True, error_ok=False)


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Only errors from these loggers for the duration: the exporter's notes on torchvision ops it skips and the
    shape inference's "treat as equal" guesses say nothing about the export, and buried its one line of output."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def weights_to_initializers(model, weights: dict[str, torch.Tensor]):
    """Turn the adapter-weight graph inputs into initializers of the same name (TensorRT refit targets)."""
    from onnx import numpy_helper

    names = {weight_input_name(k): v for k, v in weights.items()}
    found = {vi.name for vi in model.graph.input} & set(names)
    if found != set(names):
        missing = sorted(set(names) - found)[0]
        raise InvdiffError(f"denoiser.onnx: adapter weight {missing!r} is not a graph input after export; "
                           "report this with your torch version")
    for vi in [vi for vi in model.graph.input if vi.name in names]:
        model.graph.input.remove(vi)
    model.graph.initializer.extend(numpy_helper.from_array(names[n].detach().cpu().numpy(), n) for n in sorted(names))
    return model


def rename_dims(model, spec: ExportSpec):
    """Name the I/O batch dims like the spec ("B", "2B") and drop inferred inner shapes (they used the exporter's
    symbols); refuse a dim the exporter made static (it silently specialises on some shape guards)."""
    for vi, t in _spec_values(model, spec):
        dims = vi.type.tensor_type.shape.dim
        for axis, symbol in t.dynamic_axes.items():
            if dims[axis].dim_value > 0:
                raise InvdiffError(f"{spec.component}.onnx: the exporter made {t.name} dim {axis} static "
                                   f"({dims[axis].dim_value}); report this with your torch version")
            dims[axis].dim_param = symbol
    del model.graph.value_info[:]
    return model


def _spec_values(model, spec: ExportSpec):
    values = {vi.name: vi for vi in list(model.graph.input) + list(model.graph.output)}
    return [(values[t.name], t) for t in spec.inputs + spec.outputs]


def external_data_path(path: str | Path) -> Path:
    """Where a component's external data lives: `NAME.onnx.data` beside `NAME.onnx`."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def save_onnx(model, path: str | Path) -> list[Path]:
    """Write `path` (+ `path.data` when the weights pass protobuf's 2 GB limit); returns the files written."""
    import onnx

    path = Path(path)
    size = sum(len(init.raw_data) for init in model.graph.initializer)
    if size <= EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path))
        return [path]
    data = external_data_path(path)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return [path, data]


def export_onnx(module: torch.nn.Module, spec: ExportSpec, path: str | Path, opset: int = MIN_OPSET,
                weights: dict[str, torch.Tensor] | None = None) -> list[Path]:
    """Export, fold, re-attach `weights` as named initializers, name the dims, check; returns the files written.
    Above LARGE_BYTES (SD-scale UNets, text encoders) the weights never enter memory again: `export_large`."""
    import onnx

    if weight_bytes(module) > LARGE_BYTES:
        return export_large(module, spec, Path(path), opset, weights)
    model = fold(torch_to_onnx(module, spec, opset, weights))
    if weights:
        model = weights_to_initializers(model, weights)
    files = save_onnx(rename_dims(model, spec), path)
    onnx.checker.check_model(str(files[0]))
    return files


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def export_large(module: torch.nn.Module, spec: ExportSpec, path: Path, opset: int = MIN_OPSET,
                 weights: dict[str, torch.Tensor] | None = None) -> list[Path]:
    """A large component: the exporter's external-data file is moved into place as `path.data`; only the graph
    is loaded and edited (adapter initializers, dim names). The exporter's own optimizer has folded constants;
    Polygraphy's folding is skipped here: with it the SD-1.5 fp16 export peaked at 11.6 GiB RSS (its UNet weighs
    1.7 GB), 3.4x the fp32 weight bytes."""
    import os

    import onnx

    data = external_data_path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        written = Path(tmp) / path.name
        write_torch_export(module, spec, written, opset, weights)
        model = onnx.load(str(written), load_external_data=False)
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        if locations != {data.name}:
            raise InvdiffError(f"{path}: the exporter wrote external data {sorted(locations)}, expected {data.name}; "
                               "report this with your torch version")
        if weights:
            model = weights_to_initializers(model, weights)
        onnx.save_model(rename_dims(model, spec), str(path))
        os.replace(Path(tmp) / data.name, data)
    onnx.checker.check_model(str(path))
    return [path, data]


def adapter_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The exported copy's adapter state (in the export precision); empty when there is no adapter."""
    adapter = getattr(getattr(module, "fused", None), "adapter", None)
    return dict(adapter.state_dict()) if adapter is not None else {}


def refit_map(weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """Adapter state_dict name -> ONNX initializer name (what TensorRT refit sets)."""
    return {k: weight_input_name(k) for k in weights}
