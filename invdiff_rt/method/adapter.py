"""The guidance adapter G_psi: a small FiLM-conditioned conv net whose output is added to the frozen base's noise
prediction, eps = eps_base + w * G_psi(x_t, t, text, eps_base). Zero at init, so w has no effect before training.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import Timesteps
from torch import nn

from .. import artifacts
from ..errors import InvdiffError

WEIGHTS_NAME = "adapter.safetensors"
MANIFEST_NAME = artifacts.FOLDER_MARKERS["adapter"]
FORMAT = "invdiff-rt/adapter"
FORMAT_VERSION = 1
BUDGET_FRACTION = 0.05  # adapter parameters <= 5 % of the base UNet's


@dataclass(frozen=True)
class AdapterConfig:
    in_channels: int = 4
    cross_attention_dim: int = 768
    width: int = 48
    depth: int = 3
    time_dim: int = 64
    use_eps_base: bool = True

    @property
    def norm_groups(self) -> int:
        return next(g for g in (8, 4, 2, 1) if self.width % g == 0)


class _FiLMBlock(nn.Module):
    """Residual block: GroupNorm -> FiLM(scale, shift from the condition) -> SiLU -> 3x3 conv."""

    def __init__(self, width: int, cond_dim: int, groups: int):
        super().__init__()
        self.width = width
        self.norm = nn.GroupNorm(groups, width)
        self.film = nn.Linear(cond_dim, 2 * width)
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        film = self.film(cond)[:, :, None, None]
        scale, shift = film[:, : self.width], film[:, self.width :]  # channel slices: no batch-dim guards
        return h + self.conv(F.silu(self.norm(h) * (1 + scale) + shift))


class GuidanceAdapter(nn.Module):
    """delta = G_psi(sample, t, pooled text, eps_base); the last conv is zero-initialised (delta == 0 at init).
    `from_t` (from adapter.json): the first timestep it acts at when sampling (None: every step)."""

    from_t: int | None = None

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        c, w, td = config.in_channels, config.width, config.time_dim
        self.time_proj = Timesteps(td, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.text_proj = nn.Linear(config.cross_attention_dim, td)
        self.cond_mlp = nn.Sequential(nn.Linear(2 * td, td), nn.SiLU(), nn.Linear(td, td), nn.SiLU())
        self.conv_in = nn.Conv2d(c * (2 if config.use_eps_base else 1), w, 3, padding=1)
        self.blocks = nn.ModuleList(_FiLMBlock(w, td, config.norm_groups) for _ in range(config.depth))
        self.norm_out = nn.GroupNorm(config.norm_groups, w)
        self.conv_out = nn.Conv2d(w, c, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                eps_base: torch.Tensor) -> torch.Tensor:
        t_emb = self.time_proj(timestep.reshape(-1).to(sample.dtype)).to(sample.dtype)
        text = self.text_proj(encoder_hidden_states.mean(dim=1))
        cond = self.cond_mlp(torch.cat([t_emb, text], dim=1))
        x = torch.cat([sample, eps_base], dim=1) if self.config.use_eps_base else sample
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, cond)
        return self.conv_out(F.silu(self.norm_out(h)))


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def adapter_param_budget(unet: nn.Module) -> int:
    """Largest allowed adapter size: 5 % of the base UNet's parameters."""
    return int(BUDGET_FRACTION * parameter_count(unet))


def config_for_unet(unet: nn.Module, **overrides: Any) -> AdapterConfig:
    """An AdapterConfig matching `unet` (channels, text width); width is halved until it fits the budget."""
    cfg = unet.config
    config = AdapterConfig(in_channels=cfg.in_channels, cross_attention_dim=cfg.cross_attention_dim, **overrides)
    budget = adapter_param_budget(unet)
    while parameter_count(GuidanceAdapter(config)) > budget and config.width > 8 and "width" not in overrides:
        config = dataclasses.replace(config, width=config.width // 2)
    return config


def save_adapter(adapter: GuidanceAdapter, out_dir: str | Path, meta: dict) -> Path:
    """Write adapter.safetensors + adapter.json into `out_dir` atomically (replacing an existing one)."""
    with artifacts.atomic_dir(out_dir, MANIFEST_NAME) as tmp:
        write_adapter(adapter, tmp, meta)
    return Path(out_dir)


def write_adapter(adapter: GuidanceAdapter, folder: Path, meta: dict) -> None:
    """adapter.safetensors + adapter.json into `folder` (a temporary `artifacts.atomic_dir`); non-finite weights
    (a diverged training) are refused."""
    if "base_fingerprint" not in meta:
        raise ValueError("write_adapter: meta must contain base_fingerprint")
    state = {k: v.detach().cpu() for k, v in adapter.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InvdiffError(f"adapter weight {bad[0]} is not finite (training diverged); lower --lr and train again")
    weights = artifacts.atomic_save_safetensors(state, folder / WEIGHTS_NAME, metadata={"format": FORMAT})
    manifest = {
        **meta,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(adapter.config),
        "parameter_count": parameter_count(adapter),
        "weights_sha256": artifacts.sha256_file(weights),
        "versions": artifacts.package_versions(),
    }
    artifacts.atomic_write_json(folder / MANIFEST_NAME, manifest)


IDENTITY = ("base_fingerprint", "weights_sha256", "config")  # the fields that loading or fingerprinting it reads


def read_adapter_manifest(adapter_dir: str | Path, require: tuple[str, ...] = ()) -> dict:
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "manifest.json").is_file() and not (adapter_dir / MANIFEST_NAME).exists():
        raise InvdiffError(f"{adapter_dir}: an export folder, not an adapter; pass it as --export, or pass the "
                           "folder `invdiff train --out` wrote as --adapter")
    if not (adapter_dir / MANIFEST_NAME).exists():
        raise InvdiffError(f"{adapter_dir / MANIFEST_NAME}: adapter manifest not found; pass the folder `invdiff "
                           "train --out` wrote")
    manifest = artifacts.read_json(adapter_dir / MANIFEST_NAME, "adapter manifest", "retrain with `invdiff train`")
    if manifest.get("format") != FORMAT:
        raise InvdiffError(f"{adapter_dir / MANIFEST_NAME}: not an invdiff-rt adapter manifest; "
                           "point to a directory written by `invdiff train`")
    missing = [key for key in require if key not in manifest]
    if missing:
        raise InvdiffError(f"{adapter_dir / MANIFEST_NAME}: adapter manifest without {', '.join(missing)}; "
                           "retrain with `invdiff train`")
    try:
        check_record(manifest)
    except ValueError as e:
        raise InvdiffError(f"{adapter_dir / MANIFEST_NAME}: malformed ({e}); retrain with `invdiff train`") from None
    return manifest


def check_record(record: dict) -> None:
    """ValueError naming the first malformed field that loading, weighting or scheduling an adapter reads, in its
    adapter.json or in the record an export keeps of it: a hand-edited file fails in one line, not deep inside
    sampling."""
    version = record.get("format_version")
    if version is not None and version != FORMAT_VERSION:
        raise ValueError(f"format_version {version!r}, this invdiff-rt reads {FORMAT_VERSION}")
    if record.get("config") is not None:
        _check_config(record["config"])
    from_t = record.get("from_t")
    if from_t is not None and not (_is_int(from_t) and from_t >= 0):
        raise ValueError(f"from_t {from_t!r} is not a timestep")
    weight = record.get("recommended_weight")
    if weight is not None and not _is_finite(weight):
        raise ValueError(f"recommended_weight {weight!r} is not a finite number")
    _check_calibration(record.get("calibration"))
    _check_second_split(record.get("second_split"))


LISTED_ROWS = ("refined_rows", "joint_rows")  # adapter.json second_split's row lists (`splits.trained_splits`)


def _check_second_split(test: Any) -> None:
    """The second split's fields that calibration and the fine-tune read back (`splits.trained_splits`)."""
    if test is None:
        return
    if not isinstance(test, dict):
        raise ValueError(f"second_split {test!r} is not a record")
    for key in LISTED_ROWS:
        rows = test.get(key, [])
        if not (isinstance(rows, list) and all(_is_int(r) and r >= 0 for r in rows)):
            raise ValueError(f"second_split.{key} is not a list of row numbers")
    fraction, temperature = test.get("joint_fraction"), test.get("finetune_temperature")  # None: an older record
    if fraction is not None and not (_is_finite(fraction) and 0 < fraction <= 1):
        raise ValueError(f"second_split.joint_fraction {fraction!r} is not in (0, 1]")
    if temperature is not None and not (_is_finite(temperature) and temperature > 0):
        raise ValueError(f"second_split.finetune_temperature {temperature!r} is not a positive number")


def _check_config(config: Any) -> None:
    if not isinstance(config, dict) or not set(config) <= {f.name for f in dataclasses.fields(AdapterConfig)}:
        raise ValueError(f"config {config!r} is not an adapter config")
    bad = next((k for k, v in config.items() if not (isinstance(v, bool) if k == "use_eps_base"
                                                      else _is_int(v) and v > 0)), None)
    if bad is not None:
        raise ValueError(f"config.{bad} {config[bad]!r} is not a {'bool' if bad == 'use_eps_base' else 'positive int'}")


def _check_calibration(calibration: Any) -> None:
    if not calibration:  # None or {}: not calibrated
        return
    table = calibration.get("by_guidance_scale", {}) if isinstance(calibration, dict) else None
    if not isinstance(table, dict):
        raise ValueError("calibration.by_guidance_scale is not a table of CFG scales")
    for scale, entry in table.items():
        if not (_is_finite(_as_float(scale)) and isinstance(entry, dict) and _is_finite(entry.get("weight"))):
            raise ValueError(f"calibration.by_guidance_scale[{scale!r}] is not a CFG scale with a finite weight")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def load_adapter(adapter_dir: str | Path, model) -> GuidanceAdapter:
    """Load a trained adapter for `model` (eval mode, frozen); refuses an adapter trained for another base."""
    adapter_dir = Path(adapter_dir)
    manifest = read_adapter_manifest(adapter_dir, IDENTITY)
    from ..models.loader import matches_model

    trained, got = manifest.get("base_fingerprint", ""), model.fingerprint
    if not matches_model(trained, getattr(model, "path", None), got):
        raise InvdiffError(f"{adapter_dir / MANIFEST_NAME}: trained for base {str(trained)[:12]}, got {got[:12]}; "
                           "retrain with --model pointing to this base")
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file() or artifacts.sha256_file(weights) != manifest.get("weights_sha256"):
        raise InvdiffError(f"{weights}: missing or does not match {MANIFEST_NAME}; retrain with `invdiff train`")
    adapter = _with_weights(manifest.get("config"), weights)
    adapter.from_t = manifest.get("from_t")
    adapter.eval().requires_grad_(False)
    return adapter


def _with_weights(config: Any, weights: Path) -> GuidanceAdapter:
    """The adapter `config` describes, holding `weights`; a config whose shapes the weights do not fit (a hand-edited
    adapter.json) is one line."""
    from safetensors.torch import load_file

    try:
        adapter = GuidanceAdapter(AdapterConfig(**config))
        adapter.load_state_dict(load_file(str(weights)))
    except (TypeError, RuntimeError) as e:  # not a mapping, or missing / mis-shaped tensors
        raise InvdiffError(f"{weights.parent / MANIFEST_NAME}: its config {config!r} does not fit {WEIGHTS_NAME}; "
                           "restore the adapter.json it was trained with, or retrain with `invdiff train`") from e
    return adapter


def adapter_fingerprint(adapter_dir: str | Path) -> str:
    """Identity of a trained adapter: its weights and architecture (not its timing fields)."""
    manifest = read_adapter_manifest(adapter_dir, IDENTITY)
    return artifacts.sha256_json({"weights": manifest["weights_sha256"], "config": manifest["config"],
                                  "base": manifest.get("base_fingerprint")})
