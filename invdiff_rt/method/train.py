"""Adapter training under Hugging Face Accelerate: frozen base + GuidanceAdapter, invariance objective.

Each step every rank draws its own batch of (sample index, group-weight row) pairs from the groups' sampling
weights with a generator seeded by (seed, rank, step): indices and group weights can never drift apart, ranks see
different batches, and a resumed run replays exactly. `--batch-size` is per process (as in the paper's code).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import artifacts
from ..models import checkpoint
from ..errors import InvdiffError
from ..parallel import map_ahead
from .adapter import MANIFEST_NAME, GuidanceAdapter, config_for_unet, parameter_count, write_adapter
from .defaults import ADAPTER_STEPS, CALIBRATION_MIN_SAMPLES, CALIBRATION_PER_PROMPT
from .grouper import (Grouping, GroupsResult, check_groups_match, clamped_share, group_erm, group_from_flags,
                      flagged_column, sampler_prior)
from .losses import (NUM_TRAIN_TIMESTEPS, _gen, denoising_target, make_noise_scheduler, progress_bar,
                     target_from_eps)
from . import splits
from .objective import invariance_objective, per_sample_loss
from .targets import (FROM_T_FRACTION, POSTERIOR_TARGETS, T_SAMPLING, TARGETS, Posterior, active_from_t,
                      draw_timesteps, timestep_probs)

SHARES_FROM = ("data", "samples")  # `--shares-from`: the data's group shares, or the base's samples' (drawn.py)
# lambda, whether the variance is scale-aware, the fallback adapter weight w (used when there is no label-free
# calibration, calibrate.py), the training target and t sampling (targets.py) and the steps, per recipe (README).
RECIPE_DEFAULTS = {
    # lambda 0 by measurement: on colored-digits the same (contrast) groups and seed gave bias_filtered 0.531 at
    # fidelity 0.910 with lambda 0 and 0.815 at fidelity 0.580 with lambda 1 (scale-aware variance); the JTT-style
    # sampling does the debiasing. rb + snr: oracle groups at w = 1, N = 32: bias 0.506 at fidelity 0.925 against
    # 0.662 / 0.916 for the posterior target and 0.809 / 0.967 (N = 64) for uniform-t noise
    # (bench/results/debiasing.md)
    # from_t "auto": the adapter acts only from the t where the groups' reweighting moves the posterior
    # (targets.active_from_t); 0: at every step. active_only: it is trained only there too. colored-digits, seed 0,
    # N = 128, label-free weight: every step (w 1.621) bias 0.094, fidelity 0.902, FID 44.5; from t = 800
    # (w 1.749) 0.141, 0.913, 35.5; from t = 800 and trained there (w 1.482) 0.117, 0.920, 32.2; the same with
    # 3,000 steps and 48 calibration samples per prompt (w 1.394) 0.136, 0.938, 29.3 (steps: ADAPTER_STEPS, defaults.py)
    "invdiff-rt": {"lam": 0.0, "scale_aware": True, "recommended_weight": 1.0, "t_sampling": "snr",
                   "target": "rb", "steps": ADAPTER_STEPS, "from_t": "auto", "active_only": True},
    "paper": {"lam": 1.0, "scale_aware": False, "recommended_weight": 1.6, "t_sampling": "uniform",
              "target": "noise", "steps": 2000, "from_t": 0, "active_only": False},
    "erm": {"lam": 0.0, "scale_aware": True, "recommended_weight": 1.0, "t_sampling": "uniform", "target": "noise",
            "steps": 2000, "from_t": 0, "active_only": False},
}


@dataclass(frozen=True)
class TrainConfig:
    recipe: str = "invdiff-rt"
    lam: float | None = None  # None: the recipe's default
    steps: int | None = None  # None: the recipe's
    lr: float = 3e-3
    batch_size: int = 32  # per process
    seed: int = 0
    warmup_steps: int = 50
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    checkpoint_every: int = 250
    resume: bool = False
    oracle_column: str | None = None
    oracle_shares: tuple[str, ...] | None = None  # `invdiff eval --json` reports of the base, one per oracle column
    shares_from: str = "data"  # the shares the target shifts from: the data's, or the base's samples' (drawn.py)
    shares_per_prompt: int | None = None  # base samples a prompt `shares_from` samples reads; None: drawn.PER_PROMPT
    show_progress: bool = True
    t_sampling: str | None = None  # uniform | snr (targets.py); None: the recipe's
    target: str | None = None  # noise | posterior | rb (targets.py); None: the recipe's
    eps_base_input: bool | None = None  # the adapter reads the frozen UNet's prediction; None: the recipe's
    from_t: int | str | None = None  # first timestep the adapter acts at when sampling; "auto"; None: the recipe's
    active_only: bool | None = None  # draw training t only where the adapter acts (t >= from_t); None: the recipe's
    calibrate: bool = True  # invdiff-rt with inferred groups: pick the weight label-free (calibrate.py)
    calibrate_scales: tuple[float, ...] = (3.0,)  # CFG scales the weight is calibrated for
    calibrate_per_prompt: int = CALIBRATION_PER_PROMPT  # generated samples per prompt at each tried weight
    calibrate_min_samples: int = CALIBRATION_MIN_SAMPLES  # ... raised to reach this many in all
    second_split: bool = True  # invdiff-rt: test the groups' candidate second split after training (splits.py)

    def __post_init__(self) -> None:
        defaults = {**RECIPE_DEFAULTS["paper"], **RECIPE_DEFAULTS.get(self.recipe, {})}
        for name in ("t_sampling", "target", "steps", "from_t", "active_only"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, defaults[name])
        if self.eps_base_input is None:  # the posterior target needs no base prediction; the others read it
            object.__setattr__(self, "eps_base_input", self.target != "posterior")

    @property
    def t_start(self) -> int:
        """The first training timestep: `from_t` with `active_only` once resolved (`train_adapter` resolves "auto"
        before the first batch), else 0."""
        return int(self.from_t) if self.active_only and self.from_t != "auto" else 0

    @property
    def lam_value(self) -> float:
        return RECIPE_DEFAULTS[self.recipe]["lam"] if self.lam is None else float(self.lam)


def check_train_config(config: TrainConfig) -> None:
    if config.recipe not in RECIPE_DEFAULTS:
        raise InvdiffError(f"--recipe {config.recipe}: unknown; use one of {', '.join(RECIPE_DEFAULTS)}")
    for flag, value in (("--steps", config.steps), ("--batch-size", config.batch_size), ("--lr", config.lr)):
        if value <= 0:
            raise InvdiffError(f"{flag} {value}: must be positive")
    if config.lam_value < 0:
        raise InvdiffError(f"--lambda {config.lam_value}: must be >= 0")
    if not config.eps_base_input and config.target != "posterior":
        raise InvdiffError(f"--no-eps-base-input: target {config.target} needs the base prediction; use --target "
                           "posterior or drop --no-eps-base-input")
    if config.from_t != "auto" and not (isinstance(config.from_t, int) and 0 <= config.from_t < NUM_TRAIN_TIMESTEPS):
        raise InvdiffError(f"--from-t {config.from_t}: give a timestep in 0..{NUM_TRAIN_TIMESTEPS - 1} (0: every "
                           "step) or auto")
    for flag, value, allowed in (("--t-sampling", config.t_sampling, T_SAMPLING), ("--target", config.target, TARGETS)):
        if value not in allowed:
            raise InvdiffError(f"{flag} {value}: unknown; use one of {', '.join(allowed)}")
    _check_oracle_shares(config)
    _check_shares_from(config)


def _check_shares_from(config: TrainConfig) -> None:
    if config.shares_from not in SHARES_FROM:
        raise InvdiffError(f"--shares-from {config.shares_from}: unknown; use one of {', '.join(SHARES_FROM)}")
    if config.shares_from == "data":
        if config.shares_per_prompt is not None:
            raise InvdiffError("--shares-per-prompt: only --shares-from samples reads base samples; add it or drop "
                               "--shares-per-prompt")
        return
    if config.oracle_shares is not None:
        raise InvdiffError("--shares-from samples: --oracle-shares-from gives the drawn shares already; drop one")
    if config.recipe == "erm" or config.target not in POSTERIOR_TARGETS:
        raise InvdiffError(f"--shares-from samples: recipe {config.recipe} with target {config.target} has no "
                           "groups' posterior to shift; use --recipe invdiff-rt (or --target rb) or drop the flag")


def _check_oracle_shares(config: TrainConfig) -> None:
    if config.oracle_shares is None:
        return
    if not config.oracle_column or config.recipe == "erm":
        raise InvdiffError("--oracle-shares-from: needs --oracle-groups-from (the reports' attributes) and a recipe "
                           "with groups; drop --oracle-shares-from, or add --oracle-groups-from COLUMN without "
                           "--recipe erm")
    columns = _columns(config)
    if len(config.oracle_shares) != len(columns):
        raise InvdiffError(f"--oracle-shares-from: {len(config.oracle_shares)} report(s) for {len(columns)} "
                           f"--oracle-groups-from column(s) ({', '.join(columns)}); give one report per column")
    if config.target not in POSTERIOR_TARGETS:
        raise InvdiffError(f"--oracle-shares-from: target {config.target} has no posterior to shift; use --target "
                           "rb or posterior")


def _resolve_grouping(groups: GroupsResult | None, inputs, data_dir, config: TrainConfig) -> tuple[Grouping, dict]:
    """The groups this run trains with (erm: none; oracle: from the hidden column(s)) and how they were made."""
    n = inputs.latents.shape[0]
    if config.recipe == "erm":
        return group_erm(n), {"groups_source": "none", "groups_fingerprint": None}
    if config.oracle_column:
        minority = flagged_column(data_dir, config.oracle_column, inputs.prompt_ids, "--oracle-groups-from")
        return group_from_flags(minority, inputs.prompt_ids, config.recipe), {
            "groups_source": f"oracle:{config.oracle_column}", "groups_fingerprint": None}
    if groups is None:
        raise InvdiffError(f"--groups: recipe {config.recipe} needs groups; run `invdiff groups` first "
                           "(or use --recipe erm / --oracle-groups-from COLUMN)")
    check_groups_match(groups, inputs)
    made_by = groups.meta.get("recipe")
    if config.recipe == "invdiff-rt" and made_by not in (None, "invdiff-rt"):  # paper groups infer no flags
        raise InvdiffError(f"--groups: made by `invdiff groups --recipe {made_by}`; the invdiff-rt recipe trains on "
                           "`--recipe invdiff-rt` groups (or pass --recipe paper to train the paper's way)")
    if config.recipe == "invdiff-rt" and not groups.grouping.inferred.any():
        raise InvdiffError(f"--groups: no row of the {n} was inferred as a minority, so there is nothing to "
                           "debias; rerun `invdiff groups` with a lower --outlier-k (or --draws 4), or check the data")
    return groups.grouping, {"groups_source": groups.meta.get("profile", {}).get("source", "inferred"),
                             "groups_fingerprint": groups.fingerprint, "groups_recipe": groups.meta.get("recipe")}


@dataclass
class Batch:
    index: torch.Tensor  # rows of the dataset (and of the group weights)
    sample: torch.Tensor  # x_t
    timestep: torch.Tensor
    text: torch.Tensor
    noise: torch.Tensor  # the denoising target (`losses.denoising_target`: the noise for epsilon models)
    group_weights: torch.Tensor
    target: torch.Tensor | None = None  # posterior: the shift delta*; rb: eps_s(x_t); noise: None (targets.py)


def draw_batch(inputs, grouping: Grouping, scheduler, config: TrainConfig, rank: int, step: int,
               posterior: Posterior | None = None) -> Batch:
    """One rank's batch: (index, group-weight row) pairs drawn together; t, noise and caption dropout seeded too.
    `posterior`: the run's `Posterior` of (inputs, grouping) for the posterior and rb targets (None: built here)."""
    g = _gen(config.seed, 7, rank, step)
    idx = torch.multinomial(grouping.sampling, config.batch_size, replacement=True, generator=g)
    x0 = inputs.latents[idx]
    noise = torch.randn(x0.shape, generator=g)
    start = config.t_start
    if config.t_sampling == "uniform" and not start:
        t = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch_size,), generator=g)
    else:
        t = draw_timesteps(timestep_probs(scheduler.alphas_cumprod, config.t_sampling, start), config.batch_size, g)
    drop = torch.rand(config.batch_size, generator=g) < config.caption_dropout
    text = torch.where(drop[:, None, None], inputs.uncond_embedding, inputs.text_embeddings[inputs.prompt_ids[idx]])
    x_t = scheduler.add_noise(x0, noise, t)
    target = None
    if config.target in POSTERIOR_TARGETS:
        prompt = torch.where(drop, -1, inputs.prompt_ids[idx])
        if posterior is None:
            posterior = Posterior.build(inputs.latents, inputs.prompt_ids, grouping.sampling)
        fn = posterior.shift if config.target == "posterior" else posterior.eps
        target = fn(x_t, t, prompt, scheduler.alphas_cumprod)
        target = target_from_eps(scheduler, x_t, target, t, shift=config.target == "posterior")
    return Batch(idx, x_t, t, text, denoising_target(scheduler.config, x0, noise, t), grouping.weights[idx], target)


def assert_only_adapter_trains(unet: torch.nn.Module, adapter: torch.nn.Module) -> None:
    """After a backward: no base parameter wants or has a gradient; every adapter parameter has one."""
    bad = [n for n, p in unet.named_parameters() if p.requires_grad or p.grad is not None]
    if bad:
        raise RuntimeError(f"base parameters would train: {bad[:3]}")
    if any(p.grad is None for p in adapter.parameters()):
        raise RuntimeError("an adapter parameter received no gradient")


def base_prediction(unet, batch: Batch, device) -> torch.Tensor:
    """The frozen UNet's noise prediction on a batch (no graph: grad mode is per thread, so it is set here; traced
    on CPU, `runtime.traced`)."""
    from ..runtime.traced import traced_eps

    with torch.no_grad():
        return traced_eps(unet)(batch.sample.to(device), batch.timestep.to(device), batch.text.to(device))


def _step_loss(adapter, batch: Batch, eps_base: torch.Tensor | None, lam: float, scale_aware: bool, device,
               shift: bool = False):
    """`shift`: delta regresses batch.target itself (target "posterior"); else eps_base + delta regresses it."""
    x_t, t, text = batch.sample.to(device), batch.timestep.to(device), batch.text.to(device)
    delta = adapter(x_t, t.float(), text, eps_base if eps_base is not None else x_t)
    if shift:
        losses = per_sample_loss(delta, batch.target.to(device))
    else:  # "noise", or "rb" (the noise Rao-Blackwellised out)
        target = batch.noise if batch.target is None else batch.target
        losses = per_sample_loss(eps_base + delta, target.to(device))
    return invariance_objective(losses, batch.group_weights.to(device), lam, scale_aware)


# ------------------------------------------------------------------------------------------- checkpoints


_NOT_IN_KEY = ("resume", "show_progress", "checkpoint_every", "calibrate", "calibrate_scales", "calibrate_per_prompt",
               "calibrate_min_samples")  # they do not change the steps: a resume may change them
_KEYED_WHEN_SET = {"oracle_shares": None, "shares_from": "data",  # fields added later: at these values they leave
                   "shares_per_prompt": None}  # earlier checkpoints' keys as they were


def _run_key(config: TrainConfig, meta: dict, processes: int | None) -> str:
    """What a checkpoint must match to be resumed: the settings that shape the steps, the run's inputs, the number
    of processes (each draws its own batch) and the second-split test's settings where it applies (a checkpoint
    written after the test holds its verdict). `processes` None: the key of checkpoints written before 2026-12-06
    (every config field, no process count), still resumed."""
    drop = ("resume", "show_progress") if processes is None else _NOT_IN_KEY
    fields = {k: v for k, v in dataclasses.asdict(config).items()
              if k not in drop and not (k in _KEYED_WHEN_SET and v == _KEYED_WHEN_SET[k])}
    split = splits.TEST_SETTINGS if _tests_split(config) else None
    return artifacts.sha256_json({"config": fields, **meta, **({} if processes is None else {"processes": processes}),
                                  **({"split_test": split} if split else {})})


def save_checkpoint(path: Path, step: int, key: str, adapter, optimizer, lr_scheduler,
                    split_test: dict | None = None) -> None:
    checkpoint.save_checkpoint(path, {"adapter": adapter}, optimizer, step,
                               {"key": key, "lr_scheduler": lr_scheduler.state_dict(), "split_test": split_test})


def load_checkpoint(path: Path, key: str | tuple[str, ...], adapter, optimizer,
                    lr_scheduler) -> tuple[int, dict | None]:
    """Restore adapter/optimizer/scheduler; returns the step to continue from (0 when there is nothing) and the
    second-split test's record when the run had made it."""
    if not checkpoint.has_checkpoint(path):
        return 0, None
    meta = checkpoint.load_checkpoint(path, {"adapter": adapter}, optimizer, (key,) if isinstance(key, str) else key,
                                      "checkpoint was made with other settings/inputs; delete it or drop --resume")
    try:
        lr_scheduler.load_state_dict(meta["lr_scheduler"])
        if not (isinstance(meta["step"], int) and 0 <= meta["step"]):
            raise ValueError("step")
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # a hand-edited state.json
        raise checkpoint.damaged(path, err) from err
    return meta["step"], meta.get("split_test")


# ------------------------------------------------------------------------------------------- the loop


def _make_optimizer(adapter, config: TrainConfig):
    from diffusers.optimization import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = min(config.warmup_steps, max(config.steps // 10, 1))
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, config.steps)


def _columns(config: TrainConfig) -> list[str]:
    return [c.strip() for c in config.oracle_column.split(",")]


def sampler_prior_of(model, data_dir, inputs, grouping: Grouping, config: TrainConfig) -> tuple[torch.Tensor | None,
                                                                                             dict]:
    """The prior the target shifts from (`targets.Posterior`) and its adapter.json record: None (the data's shares),
    the base's samples read label-free (`--shares-from samples`, drawn.py) or oracle reports."""
    if config.shares_from == "samples":
        from .drawn import PER_PROMPT, drawn_prior

        return drawn_prior(model, data_dir, inputs, grouping.inferred, config.calibrate_scales[0], config.seed,
                           config.shares_per_prompt or PER_PROMPT)
    return oracle_prior(model, inputs, grouping, config)


def oracle_prior(model, inputs, grouping: Grouping, config: TrainConfig) -> tuple[torch.Tensor | None, dict]:
    """`--oracle-shares-from REPORT...`: the prior of `targets.Posterior` from the base's per-prompt majority shares
    in `invdiff eval --json` reports of the base, one per oracle column (comparison only; None without the flag).
    `grouping`: the oracle groups of those columns (their `flags`)."""
    if config.oracle_shares is None:
        return None, {}
    columns = _columns(config)
    reports = {r["attribute"]: (path, r) for path, r in
               ((path, _base_report(path, model, inputs, columns)) for path in config.oracle_shares)}
    missing = [c for c in columns if c not in reports]
    if missing:
        raise InvdiffError(f"--oracle-shares-from: no report on attribute {missing[0]}; give one report per "
                           f"--oracle-groups-from column ({', '.join(columns)})")
    recorded = {c: _drawn_shares(*reports[c], inputs.prompts) for c in columns}
    shares = [list(recorded[c]["majority_share"].values()) for c in columns]
    meta = {"source": f"oracle:{config.oracle_column}", "by_attribute": recorded}
    return sampler_prior(grouping.flags, inputs.prompt_ids, shares), {"sampler_prior": meta}


def _drawn_shares(path: str, report: dict, prompts: list[str]) -> dict:
    """adapter.json's record of one report: where it is, its hash, its CFG scale and its per-prompt shares, clamped
    to 0.5/n..1 - 0.5/n."""
    n = report["n_per_prompt"]
    shares = [clamped_share(report["per_prompt"][p]["majority_share"], n) for p in prompts]
    return {"report": str(path), "report_sha256": artifacts.sha256_file(path),
            "guidance_scale": report["settings"]["guidance_scale"], "majority_share": dict(zip(prompts, shares))}


def _base_report(path, model, inputs, columns: list[str]) -> dict:
    """The `invdiff eval --json` report at `path`, checked to be of this base's own samples of this data on one of
    `columns`, with a share in 0..1 for every prompt."""
    fix = (f"give the report of `invdiff eval --model M --data DATA --attribute {'|'.join(columns)} --json REPORT` "
           "(no --adapter)")
    report = artifacts.read_json(path, "--oracle-shares-from report", fix)
    settings, per_prompt = _mapping(report.get("settings")), _mapping(report.get("per_prompt"))
    shares = [_mapping(per_prompt.get(p)).get("majority_share") for p in inputs.prompts]
    problems = [(report.get("attribute") not in columns, f"a report on attribute {report.get('attribute')!r}"),
                (settings.get("adapter_fingerprint") is not None, "a report of an adapter's samples"),
                (settings.get("model_fingerprint") != model.fingerprint, "a report of another base model"),
                (settings.get("data_fingerprint") != inputs.data_fingerprint, "a report on other data"),
                (not all(_real(v, 0, 1) for v in shares), "a report without a majority_share in 0..1 for every prompt"),
                (not _real(report.get("n_per_prompt"), 1, math.inf), "a report without a positive n_per_prompt"),
                (not _real(settings.get("guidance_scale"), 0, math.inf), "a report without its guidance_scale")]
    bad = next((what for wrong, what in problems if wrong), None)
    if bad:
        raise InvdiffError(f"--oracle-shares-from {path}: {bad}; {fix}")
    return report


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _real(value, low: float, high: float) -> bool:
    """A JSON number (not a bool) in [low, high]; NaN is not."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def _from_t(noise_scheduler, inputs, grouping: Grouping, config: TrainConfig, prior=None) -> dict:
    """adapter.json's `from_t` (and, for "auto", the shift profile that chose it)."""
    if config.from_t != "auto":
        return {"from_t": int(config.from_t)}
    from_t, profile = active_from_t(noise_scheduler, inputs.latents, inputs.prompt_ids, grouping.sampling,
                                    prior=prior)
    return {"from_t": from_t, "from_t_rule": {"fraction": FROM_T_FRACTION, "shift_rms": profile}}


def _run_meta(model, inputs, group_meta: dict, config: TrainConfig) -> dict:
    defaults = RECIPE_DEFAULTS[config.recipe]
    return {"base_fingerprint": model.fingerprint, "data_fingerprint": inputs.data_fingerprint, **group_meta,
            "recipe": config.recipe, "lambda": config.lam_value, "variance": "cv2" if defaults["scale_aware"]
            else "raw", "steps": config.steps, "lr": config.lr, "batch_size_per_process": config.batch_size,
            "seed": config.seed, "caption_dropout": config.caption_dropout, "t_sampling": config.t_sampling,
            "target": config.target, "eps_base_input": config.eps_base_input, "active_only": config.active_only}


@dataclass
class _Run:
    unet: torch.nn.Module
    adapter: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    noise_scheduler: object
    inputs: object
    grouping: Grouping
    posterior: Posterior | None  # the posterior and rb targets' tables, built once
    key: str
    ckpt: Path
    split_test: dict | None = None  # the second-split test's record, once made (splits.py)
    prior: torch.Tensor | None = None  # what the base's sampler draws (`--oracle-shares-from`; targets.Posterior)
    data_dir: str | Path | None = None  # the training images' folder (the second split's refinement reads them)


def _train_step(accelerator, run: _Run, config: TrainConfig, step: int, first: bool,
                prepared: tuple[Batch, torch.Tensor]) -> dict:
    """One optimizer step on `prepared` = (this step's batch, the frozen UNet's prediction on it)."""
    scale_aware = RECIPE_DEFAULTS[config.recipe]["scale_aware"]
    batch, eps_base = prepared
    terms = _step_loss(run.adapter, batch, eps_base, config.lam_value, scale_aware, accelerator.device,
                       shift=config.target == "posterior")
    run.optimizer.zero_grad(set_to_none=True)
    accelerator.backward(terms.loss)
    if first:
        assert_only_adapter_trains(run.unet, run.adapter)
    accelerator.clip_grad_norm_(run.adapter.parameters(), config.grad_clip)
    run.optimizer.step()
    run.lr_scheduler.step()
    logged = accelerator.gather(torch.stack([terms.loss, terms.mean, terms.penalty]).detach()[None])
    loss, mean, penalty = logged.float().mean(0).tolist()
    return {"loss": loss, "mean": mean, "penalty": penalty}


def _prepared(run: _Run, config: TrainConfig, rank: int, step: int, device) -> tuple[Batch, torch.Tensor | None]:
    """A step's batch and the frozen UNet's prediction on it (None when the adapter does not read it)."""
    batch = draw_batch(run.inputs, run.grouping, run.noise_scheduler, config, rank, step, run.posterior)
    return batch, base_prediction(run.unet, batch, device) if config.eps_base_input else None


def _prepared_steps(accelerator, run: _Run, config: TrainConfig, steps: range):
    """(batch, frozen UNet prediction) for every step of `steps`, in order. Neither depends on the adapter, so on a
    CPU they are made ahead in single-threaded workers while the adapter trains on one thread
    (`parallel.map_ahead`): every step is computed alike however many cores there are, and a resumed run replays
    an uninterrupted one exactly. On 2 cores 17-25 % less time than making a chunk of steps side by side, then
    training on it with both threads (colored-digits, 2,000 steps, interleaved: bench/results/train_loop.json)."""
    rank, device = accelerator.process_index, accelerator.device
    return map_ahead(lambda s: _prepared(run, config, rank, s, device), steps, device)


def _loop(accelerator, run: _Run, config: TrainConfig, start_step: int, stop_step: int, advance,
          checkpoints: bool = True) -> dict:
    last, steps = {}, range(start_step, stop_step)
    with contextlib.closing(_prepared_steps(accelerator, run, config, steps)) as prepared:  # ends the workers
        for step, batch in zip(steps, prepared):  # even when a step raises
            last = _train_step(accelerator, run, config, step, step == start_step, batch)
            check_finite_loss(last["loss"], step)
            advance(1, loss=last["loss"], mean=last["mean"], var=last["penalty"],
                    lr=run.lr_scheduler.get_last_lr()[0])
            if checkpoints and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                _save_run(accelerator, run, step + 1)
    return last


def check_finite_loss(loss: float, step: int) -> None:
    """A diverged training stops at the step whose loss is not finite, before anything more is written."""
    if not math.isfinite(loss):
        raise InvdiffError(f"train: the loss is {loss} at step {step + 1} (training diverged); rerun with a lower "
                           "--lr and without --resume (the checkpoint holds this --lr's steps)")


def _save_run(accelerator, run: _Run, step: int) -> None:
    if accelerator.is_main_process:
        save_checkpoint(run.ckpt, step, run.key, accelerator.unwrap_model(run.adapter), run.optimizer,
                        run.lr_scheduler, run.split_test)
    accelerator.wait_for_everyone()


def _train(accelerator, run: _Run, config: TrainConfig, start_step: int) -> dict:
    """The training steps; where the groups carry a candidate second split, the trained adapter tests it and, when it
    is a second attribute, is fine-tuned with both splits balanced (splits.py)."""
    show = config.show_progress and accelerator.is_main_process
    with progress_bar(config.steps, f"train adapter ({config.recipe})", show) as advance:
        advance(start_step)
        last = _loop(accelerator, run, config, start_step, config.steps, advance)
    if not (_tests_split(config) and splits.has_candidate(run.grouping)):
        return last
    if run.split_test is None:  # a run resumed after the test has it from its checkpoint
        run.split_test = _split_test(accelerator, run, config)
        if run.split_test["second_attribute"]:
            _save_run(accelerator, run, config.steps)  # a crash in the fine-tune resumes from here
    return _finetune(accelerator, run, config, show) if run.split_test["second_attribute"] else last


def _tests_split(config: TrainConfig) -> bool:
    return config.second_split and config.recipe == "invdiff-rt" and not config.oracle_column


def _split_test(accelerator, run: _Run, config: TrainConfig) -> dict:
    """The second-split test on the trained adapter (splits.attribute_test), as adapter.json records it; run by the
    main process and shared, so that every process fine-tunes or none does."""
    record = [None]
    if accelerator.is_main_process:
        adapter = accelerator.unwrap_model(run.adapter)
        result = splits.attribute_test(run.unet, adapter, run.noise_scheduler, run.inputs, run.grouping.inferred,
                                       run.grouping.candidate, splits.TEST_WEIGHT, config.seed, splits.SCORE_BATCH)
        record[0] = {**result.record(), "candidate_size": int(run.grouping.candidate.sum()),
                     "finetune_steps": splits.finetune_steps(config.steps) if result.second_attribute else 0,
                     **(_refined(run) if result.second_attribute else {})}
        if result.second_attribute:
            record[0]["finetune_temperature"] = splits.FINETUNE_TEMPERATURE
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(record)
    return record[0]


def _refined(run: _Run) -> dict:
    """The second split the fine-tune balances (`splits.refine`) and the first split's rows read as it
    (`splits.joint_rows`), as the test's record lists them."""
    from .drawn import reader_images

    x, first, prompts = reader_images(run.data_dir), run.grouping.inferred, len(run.inputs.prompts)
    pids = run.inputs.prompt_ids
    flags = splits.refine(x, pids, first, run.grouping.candidate, prompts)
    joint = splits.joint_rows(x, pids, first, flags, prompts)
    return {"refined_rounds": splits.REFINE_ROUNDS, "refined_size": int(flags.sum()),
            "refined_rows": torch.nonzero(flags).squeeze(1).tolist(), "joint_fraction": splits.JOINT_FRACTION,
            "joint_rows": torch.nonzero(joint).squeeze(1).tolist()}


def _finetune(accelerator, run: _Run, config: TrainConfig, show: bool) -> dict:
    """`splits.finetune_steps` more steps (steps S.. of the batch seeds) on both splits' raked sampler, with a fresh
    optimizer and LR schedule; no checkpoints (a crash resumes from the end of the first run)."""
    steps = run.split_test["finetune_steps"]
    trained = splits.trained_splits(run.split_test, len(run.inputs.prompt_ids))  # None where an older record lacks it
    run.grouping = splits.with_second_split(run.grouping, run.inputs.prompt_ids, *trained)
    if run.posterior is not None:  # adapters and checkpoints from before the temperature: the exact shift
        run.posterior = Posterior.build(run.inputs.latents, run.inputs.prompt_ids, run.grouping.sampling, run.prior,
                                        run.split_test.get("finetune_temperature", 1.0))
    optimizer, run.lr_scheduler = _make_optimizer(accelerator.unwrap_model(run.adapter),
                                                  dataclasses.replace(config, steps=steps))
    run.optimizer = accelerator.prepare(optimizer)
    with progress_bar(steps, "fine-tune adapter (second split)", show) as advance:
        return _loop(accelerator, run, config, config.steps, config.steps + steps, advance, checkpoints=False)


def _calibrate(model, out_dir: Path, inputs, groups, config: TrainConfig) -> None:
    from .calibrate import CalibrateConfig, calibrate_adapter, calibrates

    if config.calibrate and not config.oracle_column and calibrates(config.recipe, groups):
        calibrate_adapter(model, out_dir, inputs, groups, CalibrateConfig(guidance_scales=config.calibrate_scales,
                                                                          per_prompt=config.calibrate_per_prompt,
                                                                          min_samples=config.calibrate_min_samples))


def train_adapter(model, data_dir: str | Path, groups: GroupsResult | None, out_dir: str | Path,
                  config: TrainConfig = TrainConfig()) -> Path:
    """The `train` stage: writes OUT_DIR/adapter.safetensors + adapter.json; returns OUT_DIR."""
    from accelerate import Accelerator

    from .cache import base_inputs

    check_train_config(config)
    out_dir = Path(out_dir)
    start = time.perf_counter()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    inputs = base_inputs(model, data_dir)
    grouping, group_meta = _resolve_grouping(groups, inputs, data_dir, config)
    prior, prior_meta = sampler_prior_of(model, data_dir, inputs, grouping, config)
    noise_scheduler = make_noise_scheduler(model)
    meta = {**_run_meta(model, inputs, group_meta, config), **prior_meta,
            **_from_t(noise_scheduler, inputs, grouping, config, prior)}
    config = dataclasses.replace(config, from_t=meta["from_t"])  # "auto" resolved: draw_batch may start there
    unet = model.unet.to(accelerator.device).eval().requires_grad_(False)
    torch.manual_seed(config.seed)
    adapter = GuidanceAdapter(config_for_unet(unet, use_eps_base=config.eps_base_input))
    optimizer, lr_scheduler = _make_optimizer(adapter, config)
    key, ckpt = _run_key(config, meta, accelerator.num_processes), artifacts.checkpoint_dir(out_dir)
    keys = (key, _run_key(config, meta, None))
    start_step, split_test = (load_checkpoint(ckpt, keys, adapter, optimizer, lr_scheduler) if config.resume
                              else (0, None))
    adapter, optimizer = accelerator.prepare(adapter, optimizer)  # the LR schedule is stepped by hand, once a step
    posterior = (Posterior.build(inputs.latents, inputs.prompt_ids, grouping.sampling, prior)
                 if config.target in POSTERIOR_TARGETS else None)
    run = _Run(unet, adapter, optimizer, lr_scheduler, noise_scheduler, inputs, grouping, posterior, key, ckpt,
               split_test, prior, data_dir)
    last = _train(accelerator, run, config, start_step)
    if accelerator.is_main_process:
        meta.update(num_processes=accelerator.num_processes, resumed_from_step=start_step, final=last,
                    second_split=run.split_test, finetune_steps=(run.split_test or {}).get("finetune_steps", 0),
                    base_parameter_count=parameter_count(unet),
                    recommended_weight=RECIPE_DEFAULTS[config.recipe]["recommended_weight"],
                    training_seconds=round(time.perf_counter() - start, 2))
        with artifacts.atomic_dir(out_dir, MANIFEST_NAME) as staged:  # in place once calibrated: an interrupted
            write_adapter(accelerator.unwrap_model(adapter), staged, meta)  # calibration keeps the checkpoint
            _calibrate(model, staged, inputs, groups, config)
        shutil.rmtree(ckpt, ignore_errors=True)
    accelerator.wait_for_everyone()
    return out_dir
