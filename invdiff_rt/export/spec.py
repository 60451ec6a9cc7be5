"""Export specs: the names, shapes, dtypes and batch range of each exported component, declared once.

One `ExportSpec` per component drives the ONNX export (`dynamic_shapes`), TensorRT optimisation profiles
(`profile()`), I/O buffer allocation (`shapes(batch)`) and tests (`sample_inputs`). The contract (stable):

- `TensorSpec.dims` holds ints (static) or the symbols `"B"` (the batch) and `"2B"` (cond + uncond halves),
  and, for an export with a resolution range, `"h"`/`"w"` (latent height/width) and `"H"`/`"W"` (image pixels).
- `TensorSpec.dtype` is a numpy dtype name, or `"model"`: the export precision (float32 for fp32, float16 for fp16).
- `sizes` is `((H, W) min, (H, W) opt, (H, W) max)` in image pixels (None: the model's one size, static dims);
  `downsample` is the VAE factor (latent h = H / downsample).
- `shapes(batch, size=None) -> {name: tuple}` for inputs and outputs at image `size` (H, W), default the opt size;
  `profile() -> {input: (min, opt, max)}` at the spec's min/opt/max batch and size; `to_json()` / `ExportSpec.from_json()` round-trip through the export manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

SYMBOLS = {"B": 1, "2B": 2}  # symbolic dim -> multiple of the batch
SIZE_SYMBOLS = ("h", "w", "H", "W")  # latent and image height / width
PRECISIONS = {"fp32": "float32", "fp16": "float16"}


def resolve_dim(dim: int | str, batch: int, size: dict[str, int] | None = None) -> int:
    if isinstance(dim, int):
        return dim
    if dim in SIZE_SYMBOLS and size is not None:
        return size[dim]
    if dim not in SYMBOLS:
        raise ValueError(f"unknown symbolic dim {dim!r}; use one of {sorted(SYMBOLS) + list(SIZE_SYMBOLS)}")
    return SYMBOLS[dim] * batch


def size_values(size: tuple[int, int], downsample: int) -> dict[str, int]:
    """{"H", "W", "h", "w"} of an image size (H, W)."""
    return {"H": size[0], "W": size[1], "h": size[0] // downsample, "w": size[1] // downsample}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[int | str, ...]
    dtype: str = "model"
    value_range: tuple[float, float] | None = None  # for sample inputs (timesteps, token ids)

    def shape(self, batch: int, size: dict[str, int] | None = None) -> tuple[int, ...]:
        return tuple(resolve_dim(d, batch, size) for d in self.dims)

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
    sizes: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None
    downsample: int = 8
    multiple: int = 8  # image sizes must be multiples of this (VAE factor x UNet 2^(blocks - 1))

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

    def _size(self, size: tuple[int, int] | None) -> dict[str, int] | None:
        if self.sizes is None:
            return None
        return size_values(tuple(size) if size is not None else self.sizes[1], self.downsample)

    def shapes(self, batch: int, size: tuple[int, int] | None = None) -> dict[str, tuple[int, ...]]:
        """Concrete shapes of every input and output at `batch` and image `size` (for buffers and engine shapes)."""
        values = self._size(size)
        return {t.name: t.shape(batch, values) for t in self.inputs + self.outputs}

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """{input name: (min shape, opt shape, max shape)}: a TensorRT optimisation profile (batch and size)."""
        batches = (self.min_batch, self.opt_batch, self.max_batch)
        sizes = self.sizes or (None, None, None)
        return {t.name: tuple(t.shape(b, self._size(s)) for b, s in zip(batches, sizes)) for t in self.inputs}

    def dynamic_shapes(self) -> dict[str, dict[int, Any] | None]:
        """`dynamic_shapes` for `torch.onnx.export(dynamo=True)`, keyed by forward-argument (= input) name.

        `Dim.DYNAMIC` everywhere: a named `Dim("B")` picks up diffusers' Upsample2D `>= 64` guard and is
        silently specialised by the exporter; the exported dims are renamed to the spec's symbols afterwards.
        """
        from torch.export import Dim

        return {t.name: ({i: Dim.DYNAMIC for i in t.dynamic_axes} or None) for t in self.inputs}

    def sample_inputs(self, batch: int, dtype: str | None = None, device: str = "cpu", seed: int = 0,
                      size: tuple[int, int] | None = None) -> dict:
        """Seeded random inputs at `batch` and image `size` (torch tensors; `dtype` overrides the precision)."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        out, values = {}, self._size(size)
        for t in self.inputs:
            np_dtype = t.numpy_dtype(dtype or self.precision)
            shape = t.shape(batch, values)
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

        keys = ("component", "min_batch", "opt_batch", "max_batch", "precision", "downsample", "multiple")
        fields = {k: data[k] for k in keys if k in data}
        if data.get("sizes"):
            fields["sizes"] = tuple(tuple(int(v) for v in s) for s in data["sizes"])
        return cls(inputs=tensors(data["inputs"]), outputs=tensors(data["outputs"]), **fields)

    def trace_size(self) -> tuple[int, int] | None:
        """The image size an export traces at: the opt size, made non-square (equal H and W would let the
        exporter give both one symbol)."""
        if self.sizes is None:
            return None
        height, width = self.sizes[1]
        return (height, width + self.multiple) if height == width else (height, width)

    @property
    def size_range(self) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """((min H, min W), (max H, max W)) of a dynamic-resolution export, else None."""
        return (self.sizes[0], self.sizes[2]) if self.sizes else None


# ---------------------------------------------------------------------------------------------------------------
# the three components of a latent diffusion model


def _opt(max_batch: int) -> int:
    return min(4, max_batch)


def text_shape(model) -> tuple[int, int]:
    """(L, D): tokens per prompt and text-encoder width."""
    return int(model.tokenizer.model_max_length), int(model.text_encoder.config.hidden_size)


def _size_fields(model, sizes) -> dict:
    """The model's downsampling and size multiple, and the spec's resolution range for a dynamic-resolution export
    (a static one recorded the defaults, 8 and 8, whatever the model)."""
    fields = {"downsample": model.vae_factor, "multiple": model.size_multiple}
    return {"sizes": tuple(tuple(int(v) for v in s) for s in sizes), **fields} if sizes else fields


def _latent_dims(model, sizes) -> tuple:
    """(C, h, w): static at the model's size, or symbolic for a resolution range."""
    c, h, w = model.latent_shape
    return (c, "h", "w") if sizes else (c, h, w)


def denoiser_spec(model, cfg: bool = True, max_batch: int = 32, precision: str = "fp32",
                  sizes=None) -> ExportSpec:
    """The fused step: UNet (at 2B with CFG) + adapter shift + CFG combine; scalars are runtime inputs."""
    c, h, w = _latent_dims(model, sizes)
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
    return ExportSpec("denoiser", tuple(inputs), outputs, 1, _opt(max_batch), max_batch, precision,
                      **_size_fields(model, sizes))


def text_encoder_spec(model, max_batch: int = 64, precision: str = "fp32") -> ExportSpec:
    """Token ids [B, L] -> last hidden state [B, L, D] (with CFG the runtime encodes 2B prompts)."""
    length, width = text_shape(model)
    vocab = int(model.text_encoder.config.vocab_size)
    return ExportSpec("text_encoder", (TensorSpec("input_ids", ("B", length), "int64", (0, vocab)),),
                      (TensorSpec("text_embeddings", ("B", length, width)),), 1, _opt(max_batch), max_batch,
                      precision)


def vae_decoder_spec(model, max_batch: int = 32, precision: str = "fp32", sizes=None) -> ExportSpec:
    """Scaled latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1] (always float32 out)."""
    c, h, w = _latent_dims(model, sizes)
    size = int(model.image_size)
    image = ("B", 3, "H", "W") if sizes else ("B", 3, size, size)
    return ExportSpec("vae_decoder", (TensorSpec("latents", ("B", c, h, w)),),
                      (TensorSpec("images", image, "float32"),), 1, _opt(max_batch), max_batch,
                      precision, **_size_fields(model, sizes))


def component_specs(model, cfg: bool = True, max_batch: int = 32, precision: str = "fp32",
                    sizes=None) -> dict[str, ExportSpec]:
    """All three specs of an export; the text encoder covers 2x the batch when CFG encodes uncond prompts and
    stays static in its token length; `sizes` ((H, W) min, opt, max) makes the image dims symbolic."""
    text_batch = 2 * max_batch if cfg else max_batch
    return {
        "denoiser": denoiser_spec(model, cfg, max_batch, precision, sizes),
        "text_encoder": text_encoder_spec(model, text_batch, precision),
        "vae_decoder": vae_decoder_spec(model, max_batch, precision, sizes),
    }
