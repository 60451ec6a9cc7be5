"""`invdiff groups` (label-free group inference) and `invdiff train` (guidance adapter, invariance objective)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..method.defaults import (ADAPTER_STEPS, CALIBRATION_CENTRE, CALIBRATION_MIN_SAMPLES, CALIBRATION_PAIRS,
                               CALIBRATION_PER_PROMPT)

THREADS_HELP = "torch CPU threads (0 = torch default; 1 is far faster on a busy machine)."
RECIPE_HELP = "invdiff-rt (default: robust split + JTT sampler) | paper (soft grouper, faithful) | erm (control)"


def groups(
    model: str = typer.Option(..., "--model", help="Base model: built-in name or diffusers directory."),
    data: Path = typer.Option(..., "--data", help="Dataset folder (uses train/)."),
    out: Path = typer.Option(..., "--out", help="Output prefix: writes PREFIX.safetensors and PREFIX.json."),
    recipe: str = typer.Option("invdiff-rt", "--recipe", help="invdiff-rt | paper"),
    n_groups: Optional[int] = typer.Option(None, "--groups", help="Number of groups (paper: default 4)."),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(256, "--batch-size", help="Base UNet batch for the loss profile."),
    draws: Optional[int] = typer.Option(
        None, "--draws", help="invdiff-rt: noise/t draws per sample inside the chosen band (default 2)."),
    grid_samples: Optional[int] = typer.Option(
        None, "--grid-samples", help="invdiff-rt: samples used to pick the t band (default 512)."),
    antithetic: bool = typer.Option(
        True, "--antithetic/--independent-draws",
        help="invdiff-rt: draws in +eps/-eps pairs sharing t (default), or independent draws (ablation)."),
    report_attribute: Optional[str] = typer.Option(
        None, "--report-attribute", help="Hidden column for diagnostics only (AUROC, precision/recall, weight)."),
    oracle_groups_from: Optional[str] = typer.Option(
        None, "--oracle-groups-from", help="Build groups from this hidden column, or several: a,b "
        "(invdiff-rt: each attribute's minority balanced on its own) (comparison only)."),
    score: str = typer.Option(
        "contrast", "--score", help="invdiff-rt: contrast (loss with the prompt / with the empty prompt) or "
        "classifier (loss with the prompt against every prompt's; P times the UNet calls in the band)."),
    outlier_k: float = typer.Option(3.0, "--outlier-k",
                                    help="invdiff-rt: inferred minority = per-prompt robust z above this (MADs)."),
    second_split: bool = typer.Option(True, "--second-split/--no-second-split",
                                      help="invdiff-rt: also record a candidate second split (a second attribute's "
                                      "minority), which `invdiff train` tests (default: on)."),
    threads: int = typer.Option(0, "--threads", help=THREADS_HELP),
) -> None:
    """Infer groups from the frozen base's per-sample denoising losses (no labels used)."""
    from ..errors import InvdiffError
    from ..method.grouper import infer_groups, save_groups
    from ..method.losses import ProfileConfig
    from ..models.loader import load_model

    for flag, value in (("--batch-size", batch_size), ("--draws", draws), ("--grid-samples", grid_samples)):
        if value is not None and value <= 0:
            raise InvdiffError(f"{flag} {value}: must be positive")
    overrides = {"draws": draws, "grid_samples": grid_samples, "antithetic": antithetic, "score": score,
                 "second_split": second_split}
    profile = ProfileConfig(**{k: v for k, v in overrides.items() if v is not None})
    _set_threads(threads)
    base = load_model(model)
    result = infer_groups(base, data, recipe=recipe, seed=seed, groups=n_groups, batch_size=batch_size,
                          profile_config=profile, oracle_column=oracle_groups_from,
                          report_attribute=report_attribute, outlier_k=outlier_k)
    weights_path, json_path = save_groups(result, out)
    _print_groups(result.meta)
    typer.echo(f"groups written to {weights_path} and {json_path}")


def _print_groups(meta: dict) -> None:
    from rich.console import Console

    console = Console()
    profile = meta.get("profile", {})
    console.print(f"recipe {meta['recipe']} ({profile.get('source')}): {meta['groups']} groups, sizes "
                  + ", ".join(f"{s:.1f}" for s in meta["group_sizes"]) + f"; inferred set {meta['inferred_size']}"
                  + (f"; band t={profile['band'][0]}-{profile['band'][1]}" if "band" in profile else "")
                  + f"; {meta['seconds']:.1f} s")
    if meta["recipe"] == "invdiff-rt" and not meta["inferred_size"]:
        console.print("WARNING: no row was inferred as a minority: `invdiff train` has nothing to debias with these "
                      "groups (a lower --outlier-k finds more)")
    if "candidate" in meta.get("grouping", {}):
        console.print(f"candidate second split: {meta['grouping']['candidate']['size']} rows (`invdiff train` tests "
                      "whether they carry a second attribute)")
    if "diagnostics" in meta:
        d = meta["diagnostics"]
        console.print(f"diagnostics vs hidden column '{d['attribute']}' (never an input): AUROC "
                      + ("n/a (no row of the column is a minority)" if d["auroc"] is None else f"{d['auroc']:.3f}")
                      + f", "
                      f"precision {d['precision']:.3f}, recall {d['recall']:.3f} "
                      f"({d['inferred_size']} inferred / {d['minority_size']} true minority), "
                      f"minority effective weight {d['minority_effective_weight']:.3f}"
                      + (f"; the candidate second split holds {d['candidate_minority']} of the true minority"
                         if "candidate_minority" in d else ""))


def train(
    model: str = typer.Option(..., "--model", help="Base model: built-in name or diffusers directory."),
    data: Path = typer.Option(..., "--data", help="Dataset folder (uses train/)."),
    groups_prefix: Optional[Path] = typer.Option(None, "--groups", help="GROUPS prefix from `invdiff groups`."),
    out: Path = typer.Option(..., "--out", help="Output ADAPTER_DIR (adapter.safetensors + adapter.json)."),
    recipe: str = typer.Option("invdiff-rt", "--recipe", help=RECIPE_HELP),
    lam: Optional[float] = typer.Option(None, "--lambda", help="Variance weight (default: recipe's; erm 0)."),
    steps: Optional[int] = typer.Option(None, "--steps",
                                        help=f"Adapter steps (default: invdiff-rt {ADAPTER_STEPS}, else 2000)."),
    lr: float = typer.Option(3e-3, "--lr"),
    batch_size: int = typer.Option(32, "--batch-size", help="Per process."),
    seed: int = typer.Option(0, "--seed"),
    checkpoint_every: int = typer.Option(250, "--checkpoint-every"),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT_DIR.ckpt if present."),
    oracle_groups_from: Optional[str] = typer.Option(
        None, "--oracle-groups-from", help="Groups from this hidden column, or several: a,b "
        "(invdiff-rt: each attribute's minority balanced on its own) (comparison only)."),
    oracle_shares_from: Optional[List[Path]] = typer.Option(
        None, "--oracle-shares-from", help="With --oracle-groups-from: an `invdiff eval --attribute COLUMN --json` "
        "report of the base, one per column (repeatable); the adapter balances the per-prompt shares the guided "
        "base draws, not the data's (comparison only)."),
    shares_from: str = typer.Option("data", "--shares-from", help="The group shares the target shifts from: data "
                                    "(the training data's) or samples (the base's own samples at CFG 3.0, the "
                                    "scale the weight is calibrated at, read by a classifier of the groups' split; "
                                    "label-free)."),
    shares_per_prompt: Optional[int] = typer.Option(None, "--shares-per-prompt", help="With --shares-from samples: "
                                                    "the base samples a prompt it reads (default 128; fewer are "
                                                    "cheaper with many prompts or an SD-scale model, and noisier)."),
    threads: int = typer.Option(0, "--threads", help=THREADS_HELP),
    t_sampling: Optional[str] = typer.Option(None, "--t-sampling", help="uniform | snr (default: the recipe's)."),
    target: Optional[str] = typer.Option(None, "--target", help="noise | posterior | rb (default: the recipe's)."),
    eps_base_input: Optional[bool] = typer.Option(None, "--eps-base-input/--no-eps-base-input",
                                                  help="The adapter reads the base's prediction (default: recipe's)."),
    from_t: Optional[str] = typer.Option(None, "--from-t", help="First timestep the adapter acts at when sampling: "
                                         "auto (invdiff-rt: where the groups move the posterior) or N (0: every "
                                         "step; paper, erm)."),
    active_only: Optional[bool] = typer.Option(None, "--active-only/--all-t", help="Train only at the t the adapter "
                                               "acts at (t >= from t) (default: the recipe's)."),
    second_split: bool = typer.Option(True, "--second-split/--no-second-split",
                                      help="invdiff-rt: test the groups' candidate second split after training and, "
                                      "when it is a second attribute, refine it and fine-tune on it (default: on)."),
    calibrate_per_prompt: int = typer.Option(CALIBRATION_PER_PROMPT, "--calibrate-per-prompt",
                                             help="invdiff-rt: the weight rule's samples per prompt at each tried "
                                             "weight (`invdiff calibrate --per-prompt`)."),
    calibrate_min_samples: int = typer.Option(CALIBRATION_MIN_SAMPLES, "--calibrate-min-samples",
                                              help="... raised to reach this many in all (`invdiff calibrate "
                                              "--min-samples`)."),
) -> None:
    """Train the guidance adapter on the frozen base with the invariance objective (Accelerate-ready)."""
    from ..errors import InvdiffError
    from ..method.grouper import load_groups
    from ..method.train import TrainConfig, check_train_config, train_adapter
    from ..models.loader import load_model

    if checkpoint_every <= 0:
        raise InvdiffError(f"--checkpoint-every {checkpoint_every}: must be positive")
    optional = (("t_sampling", t_sampling), ("target", target), ("eps_base_input", eps_base_input),
                ("active_only", active_only), ("from_t", _from_t_option(from_t)))
    config = TrainConfig(recipe=recipe, lam=lam, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                         checkpoint_every=checkpoint_every, resume=resume, oracle_column=oracle_groups_from,
                         oracle_shares=tuple(str(p.resolve()) for p in oracle_shares_from or ()) or None,
                         shares_from=shares_from, shares_per_prompt=shares_per_prompt, second_split=second_split,
                         calibrate_per_prompt=calibrate_per_prompt, calibrate_min_samples=calibrate_min_samples,
                         **{k: v for k, v in optional if v is not None})
    check_train_config(config)
    _set_threads(threads)
    group_result = None
    if groups_prefix is not None and recipe != "erm" and not oracle_groups_from:
        group_result = load_groups(groups_prefix)
    path = train_adapter(load_model(model), data, group_result, out, config)
    typer.echo(f"adapter written to {path}")
    _print_split_test(path)
    from ..method.calibrate import resolve_weight
    from ..runtime.defaults import DEFAULT_GUIDANCE

    weight, how = resolve_weight(None, DEFAULT_GUIDANCE, adapter_dir=path)
    typer.echo(f"adapter weight at CFG {DEFAULT_GUIDANCE:g}: {weight:g} ({how})")


def _print_split_test(adapter_dir: Path) -> None:
    from ..method.adapter import read_adapter_manifest
    from ..method.splits import describe

    test = read_adapter_manifest(adapter_dir).get("second_split")
    if test:
        typer.echo(describe(test))


def _from_t_option(text: str | None) -> int | str | None:
    """An int when `text` is one; anything else as given (`train.check_train_config` refuses all but "auto")."""
    return int(text) if text is not None and text.removeprefix("-").isdigit() else text


def calibrate(
    model: str = typer.Option(..., "--model", help="Base model: built-in name or diffusers directory."),
    data: Path = typer.Option(..., "--data", help="Dataset folder (uses train/)."),
    groups_prefix: Path = typer.Option(..., "--groups", help="GROUPS prefix the adapter was trained with."),
    adapter: Path = typer.Option(..., "--adapter", help="ADAPTER_DIR from `invdiff train` (adapter.json is updated)."),
    guidance_scale: List[float] = typer.Option([3.0], "--guidance-scale", help="CFG scale(s) to calibrate for "
                                               "(repeatable; each gets its own weight)."),
    per_prompt: int = typer.Option(CALIBRATION_PER_PROMPT, "--per-prompt",
                                   help="Samples per prompt at each tried weight."),
    min_samples: int = typer.Option(CALIBRATION_MIN_SAMPLES, "--min-samples",
                                    help="... raised to reach this many in all (few-prompt datasets)."),
    pairs: int = typer.Option(CALIBRATION_PAIRS, "--pairs", help="The detector's antithetic pairs per generated "
                              "sample (more pairs: a weight less tied to --seed; the reference's are raised for "
                              "few inferred rows)."),
    centre: str = typer.Option(CALIBRATION_CENTRE, "--centre", help="Where the generated samples' cut is centred: "
                               "base (the base model's own samples at w = 0) or training (the training rows', the "
                               "rule before the base centre)."),
    seed: int = typer.Option(1000, "--seed", help="Sampling/scoring seed (keep it apart from evaluation seeds)."),
    threads: int = typer.Option(0, "--threads", help=THREADS_HELP),
) -> None:
    """Pick the adapter weight without labels (the groups' score on the adapter's own samples)."""
    from ..errors import InvdiffError
    from ..method.cache import base_inputs
    from ..method.adapter import read_adapter_manifest
    from ..method.calibrate import (CalibrateConfig, calibrate_adapter, calibrates, check_calibratable,
                                    unbracketed_note)
    from ..method.grouper import load_groups
    from ..models.loader import load_model

    groups = load_groups(groups_prefix)
    if not calibrates("invdiff-rt", groups):
        raise InvdiffError(f"--groups {groups_prefix}: not inferred by `invdiff groups --recipe invdiff-rt`; the "
                           "rule reuses their score")
    check_calibratable(read_adapter_manifest(adapter), groups, adapter, groups_prefix)
    _set_threads(threads)
    base = load_model(model)
    config = CalibrateConfig(guidance_scales=tuple(guidance_scale), per_prompt=per_prompt,
                             min_samples=min_samples, pairs=pairs, centre=centre, seed=seed)
    record = calibrate_adapter(base, adapter, base_inputs(base, data), groups, config)
    for scale, row in record["by_guidance_scale"].items():
        tried = ", ".join(f"w={w:g}: {r:.3f}" for w, r in row["tried"])
        typer.echo(f"CFG {scale}: weight {row['weight']:g} (flag rate target {record['target_rate']:.3f}; {tried})"
                   + unbracketed_note(record, scale))
    typer.echo(f"recorded in {adapter / 'adapter.json'} ({record['seconds']:.1f} s)")


def _set_threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def register(app: typer.Typer) -> None:
    app.command("groups")(groups)
    app.command("train")(train)
    app.command("calibrate")(calibrate)
