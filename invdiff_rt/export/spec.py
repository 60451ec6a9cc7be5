"""Export specs: the names, shapes, dtypes and batch range of each exported component, declared once.

One `ExportSpec` per component drives the ONNX export (`dynamic_shapes`), TensorRT optimisation profiles
(`profile()`), I/O buffer allocation (`shapes(batch)`) and tests (`sample_inputs`). The contract (stable):

- `TensorSpec.dims` holds ints (static) or the symbols `"B"` (the batch) and `"2B"` (cond + uncond halves).
- `TensorSpec.dtype` is a numpy dtype name, or `"model"`: the export precision (float32 for fp32, float16 for fp16).
- `shapes(batch) -> {name: tuple}` for inputs and outputs; `profile() -> {input: (min, opt, max)}` at the
  spec's min/opt/max batch; `to_json()` / `ExportSpec.from_json()` round-trip through the export manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

SYMBOLS = {"B": 1, "2B": 2}  # symbolic dim -> multiple of the batch
PRECISIONS = {"fp32": "float32", "fp16": "float16"}


def resolve_dim(dim: int | str, batch: int) -> int:
    if isinstance(dim, int):
        return dim
    if dim not in SYMBOLS:
        raise ValueError(f"unknown symbolic dim {dim!r}; use one of {sorted(SYMBOLS)}")
    return SYMBOLS[dim] * batch


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[int | str, ...]
    dtype: str = "model"
    value_range: tuple[float, float] | None = None  # for sample inputs (timesteps, token ids)

    def shape(self, batch: int) -> tuple[int, ...]:
        return tuple(resolve_dim(d, batch) for d in self.dims)

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str)}

    def numpy_dtype(self, precision: str = "fp32") -> str:
        return PRECISIONS[precision] if self.dtype == "model" else self.dtype


@dataclass(frozen=True)
class ExportSpec:
    component: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 32
    precision: str = "fp32"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs + self.outputs if t.name == name)

    def dtype(self, name: str) -> str:
        """numpy dtype name of an input or output at this spec's precision."""
        return self.tensor(name).numpy_dtype(self.precision)

    def shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Concrete shapes of every input and output at `batch` (for buffers and engine shapes)."""
        return {t.name: t.shape(batch) for t in self.inputs + self.outputs}

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """{input name: (min shape, opt shape, max shape)}: a TensorRT optimisation profile."""
        batches = (self.min_batch, self.opt_batch, self.max_batch)
        return {t.name: tuple(t.shape(b) for b in batches) for t in self.inputs}

    def dynamic_shapes(self) -> dict[str, dict[int, Any] | None]:
        """`dynamic_shapes` for `torch.onnx.export(dynamo=True)`, keyed by forward-argument (= input) name.

        `Dim.DYNAMIC` everywhere: a named `Dim("B")` picks up diffusers' Upsample2D `>= 64` guard and is
        silently specialised by the exporter; the exported dims are renamed to the spec's symbols afterwards.
        """
        from torch.export import Dim

        return {t.name: ({i: Dim.DYNAMIC for i in t.dynamic_axes} or None) for t in self.inputs}

    def sample_inputs(self, batch: int, dtype: str | None = None, device: str = "cpu", seed: int = 0) -> dict:
        """Seeded random inputs at `batch` (torch tensors; `dtype` overrides the precision, e.g. "fp16")."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        out = {}
        for t in self.inputs:
            np_dtype = t.numpy_dtype(dtype or self.precision)
            shape = t.shape(batch)
            if np_dtype.startswith("int"):
                lo, hi = t.value_range or (0, 2)
                x = torch.randint(int(lo), int(hi), shape, generator=gen, dtype=getattr(torch, np_dtype))
            elif t.value_range is not None:
                lo, hi = t.value_range
                x = lo + (hi - lo) * torch.rand(shape, generator=gen)
            else:
                x = torch.randn(shape, generator=gen)
            out[t.name] = x.to(device=device, dtype=getattr(torch, np_dtype))
        return out

    def with_precision(self, precision: str) -> "ExportSpec":
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: use one of {sorted(PRECISIONS)}")
        return replace(self, precision=precision)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ExportSpec":
        def tensors(items):
            return tuple(TensorSpec(t["name"], tuple(t["dims"]), t["dtype"],
                                    tuple(t["value_range"]) if t.get("value_range") else None) for t in items)

        fields = {k: data[k] for k in ("component", "min_batch", "opt_batch", "max_batch", "precision") if k in data}
        return cls(inputs=tensors(data["inputs"]), outputs=tensors(data["outputs"]), **fields)


# ---------------------------------------------------------------------------------------------------------------
# the three components of a latent diffusion model


def _opt(max_batch: int) -> int:
    return min(4, max_batch)


def text_shape(model) -> tuple[int, int]:
    """(L, D): tokens per prompt and text-encoder width."""
    return int(model.tokenizer.model_max_length), int(model.text_encoder.config.hidden_size)


def denoiser_spec(model, cfg: bool = True, max_batch: int = 32, precision: str = "fp32") -> ExportSpec:
    """The fused step: UNet (at 2B with CFG) + adapter shift + CFG combine; scalars are runtime inputs."""
    c, h, w = model.latent_shape
    length, width = text_shape(model)
    inputs = [
        TensorSpec("sample", ("B", c, h, w)),
        TensorSpec("timestep", ("B",), "float32", (0.0, 999.0)),
        TensorSpec("text_embeddings", ("2B" if cfg else "B", length, width)),
    ]
    if cfg:
        inputs.append(TensorSpec("guidance_scale", (), "float32", (1.0, 9.0)))
    inputs.append(TensorSpec("adapter_weight", (), "float32", (0.0, 1.0)))
    outputs = (TensorSpec("noise_pred", ("B", c, h, w)),)
    return ExportSpec("denoiser", tuple(inputs), outputs, 1, _opt(max_batch), max_batch, precision)


def text_encoder_spec(model, max_batch: int = 64, precision: str = "fp32") -> ExportSpec:
    """Token ids [B, L] -> last hidden state [B, L, D] (with CFG the runtime encodes 2B prompts)."""
    length, width = text_shape(model)
    vocab = int(model.text_encoder.config.vocab_size)
    return ExportSpec("text_encoder", (TensorSpec("input_ids", ("B", length), "int64", (0, vocab)),),
                      (TensorSpec("text_embeddings", ("B", length, width)),), 1, _opt(max_batch), max_batch,
                      precision)


def vae_decoder_spec(model, max_batch: int = 32, precision: str = "fp32") -> ExportSpec:
    """Scaled latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1] (always float32 out)."""
    c, h, w = model.latent_shape
    size = int(model.image_size)
    return ExportSpec("vae_decoder", (TensorSpec("latents", ("B", c, h, w)),),
                      (TensorSpec("images", ("B", 3, size, size), "float32"),), 1, _opt(max_batch), max_batch,
                      precision)


def component_specs(model, cfg: bool = True, max_batch: int = 32, precision: str = "fp32") -> dict[str, ExportSpec]:
    """All three specs of an export; the text encoder covers 2x the batch when CFG encodes uncond prompts."""
    text_batch = 2 * max_batch if cfg else max_batch
    return {
        "denoiser": denoiser_spec(model, cfg, max_batch, precision),
        "text_encoder": text_encoder_spec(model, text_batch, precision),
        "vae_decoder": vae_decoder_spec(model, max_batch, precision),
    }
