"""Image sizes: what a model or an export accepts, checked once before any work (one-line errors).

A size (H, W) must be a multiple of the model's total downsampling (VAE factor x UNet 2^(blocks - 1)) and, for an
export, lie in the range it was exported for (`invdiff export --min-size/--max-size` or `--sizes`); an export
without a range runs only at its model's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import InvdiffError

Size = tuple[int, int]
MAX_SIDE = 8192  # px: the largest --height/--width/--sizes accepted (SDXL's 1024 x 8)


@dataclass(frozen=True)
class SizeLimits:
    channels: int
    downsample: int  # VAE factor: latent = image / downsample
    multiple: int  # image pixels
    default: Size
    min: Size | None = None  # None: any size (a torch model)
    max: Size | None = None
    source: str = "--model"

    def latent_shape(self, size: Size) -> tuple[int, int, int]:
        return (self.channels, size[0] // self.downsample, size[1] // self.downsample)


def limits_of_config(unet: dict, vae: dict) -> SizeLimits:
    """Limits of a model from its UNet and VAE configs (no weights needed)."""
    sample = unet["sample_size"]
    sample = sample if isinstance(sample, int) else sample[0]
    downsample = 2 ** (len(vae["block_out_channels"]) - 1)
    multiple = downsample * 2 ** (len(unet["block_out_channels"]) - 1)
    return SizeLimits(int(unet["in_channels"]), downsample, multiple, (sample * downsample,) * 2)


def limits_of_model_dir(path: str | Path) -> SizeLimits:
    from ..artifacts import read_json

    path = Path(path)
    return limits_of_config(read_json(path / "unet" / "config.json", "UNet config"),
                            read_json(path / "vae" / "config.json", "VAE config"))


def limits_of_model(model) -> SizeLimits:
    return limits_of_config(dict(model.unet.config), dict(model.vae.config))


def limits_of_manifest(manifest: dict, export_dir: str | Path = "") -> SizeLimits:
    """An export's limits from its denoiser spec (the one place its shapes are declared)."""
    from ..export.spec import ExportSpec

    spec = ExportSpec.from_json(manifest["components"]["denoiser"]["spec"])
    channels, h, w = manifest["latent_shape"]
    if spec.sizes is None:  # a static export: only the model's own size
        factor = int(manifest.get("image_size", 8 * h)) // h
        default = (h * factor, w * factor)
        return SizeLimits(channels, factor, factor, default, default, default, f"--export {export_dir}")
    default = (h * spec.downsample, w * spec.downsample)
    lo, hi = spec.size_range
    if not _within(default, lo, hi):  # exported for other sizes than the model's: its opt size
        default = tuple(spec.sizes[1])
    return SizeLimits(channels, spec.downsample, spec.multiple, default, lo, hi, f"--export {export_dir}")


def check_size(limits: SizeLimits, height: int | None = None, width: int | None = None,
               flag: str = "--height/--width") -> Size:
    """The requested (H, W) (a missing one is the default's), or a one-line error."""
    size = (int(height or limits.default[0]), int(width or limits.default[1]))
    text = f"{flag} {size[0]}x{size[1]}"
    if min(size) < 1 or size[0] % limits.multiple or size[1] % limits.multiple:
        raise InvdiffError(f"{text}: not a multiple of {limits.multiple} (VAE factor "
                           f"{limits.downsample} x UNet {limits.multiple // limits.downsample}); pass multiples of "
                           f"{limits.multiple}, e.g. {limits.default[0]}x{limits.default[1]}")
    if max(size) > MAX_SIDE:
        raise InvdiffError(f"{text}: larger than {MAX_SIDE} px a side, where one sample's latents and activations "
                           f"outgrow memory (SD checkpoints are trained at 512-1024 px); pass a smaller size")
    if limits.min is not None and not _within(size, limits.min, limits.max):
        raise InvdiffError(f"{text}: outside the range of {limits.source} "
                           f"({_fmt(limits.min)} to {_fmt(limits.max)}); pick a size in range or re-export with "
                           f"--min-size/--max-size covering it")
    return size


def _within(size: Size, lo: Size, hi: Size) -> bool:
    return _le(lo, size) and _le(size, hi)


def _le(a: Size, b: Size) -> bool:
    return a[0] <= b[0] and a[1] <= b[1]


def _fmt(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def parse_size(text: str, flag: str) -> Size:
    """"512" -> (512, 512); "512x768" -> (H 512, W 768)."""
    parts = text.lower().replace(" ", "").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise InvdiffError(f"{flag} {text}: not a size; write N or HxW, e.g. 512 or 512x768")
    return (values[0], values[-1])


def export_sizes(limits: SizeLimits, min_size: str | None = None, max_size: str | None = None,
                 sizes: str | None = None) -> tuple[Size, Size, Size] | None:
    """(min, opt, max) image sizes of an export from `--min-size/--max-size` or a `--sizes` list; None: static."""
    if sizes and (min_size or max_size):
        raise InvdiffError("--sizes: pass either --sizes or --min-size/--max-size, not both")
    if sizes:
        listed = [parse_size(s, "--sizes") for s in sizes.split(",") if s.strip()]
        if not listed:
            raise InvdiffError(f"--sizes {sizes}: no size given; write sizes such as 512x512,512x768")
        for size in listed:  # every one: the first is the profile's opt shape
            check_size(limits, *size, flag="--sizes")
        lo = (min(s[0] for s in listed), min(s[1] for s in listed))
        hi = (max(s[0] for s in listed), max(s[1] for s in listed))
        opt = listed[0]
    elif min_size or max_size:  # a missing bound: the model's size, or the given one where that lies beyond it
        lo = parse_size(min_size, "--min-size") if min_size else None
        hi = parse_size(max_size, "--max-size") if max_size else None
        for flag, size in (("--min-size", lo), ("--max-size", hi)):
            if size:
                check_size(limits, *size, flag=flag)  # a given bound, under its own flag
        lo = lo or (min(hi[0], limits.default[0]), min(hi[1], limits.default[1]))
        hi = hi or (max(lo[0], limits.default[0]), max(lo[1], limits.default[1]))
        opt = limits.default if _within(limits.default, lo, hi) else lo
    else:
        return None
    if not _le(lo, hi):
        raise InvdiffError(f"--min-size {_fmt(lo)}: larger than --max-size {_fmt(hi)}; swap them")
    return (lo, opt, hi)


def requested_latent_shape(*, model=None, export=None, height: int | None = None,
                           width: int | None = None) -> tuple[int, int, int] | None:
    """Latent shape for `--height/--width` against an export folder or a model (name or folder), checked before
    anything is loaded; None when neither is given (the runtime's default size: the model's), or the export's
    default size where its range leaves the model's out."""
    if export is not None:
        from ..export.manifest import read_manifest

        manifest = read_manifest(export, verify=False)
        limits = limits_of_manifest(manifest, export)
        if height is None and width is None:
            shape = limits.latent_shape(limits.default)
            return None if list(shape) == list(manifest.get("latent_shape", ())) else shape
    elif height is None and width is None:
        return None
    else:
        from ..models.loader import resolve_model

        limits = limits_of_model_dir(resolve_model(model))
    return limits.latent_shape(check_size(limits, height, width))
