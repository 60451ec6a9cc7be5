"""The `calibrate` stage: a label-free adapter weight, per CFG scale, recorded in adapter.json.

The rule reuses the detector that found the groups. The groups' score (`losses.py`: the contrast loss(x_t | prompt)
/ loss(x_t | empty), or with `--score classifier` the loss against every prompt's, in the band the grouper chose,
one antithetic pair) flags a sample as inferred minority when its per-prompt robust z exceeds the grouper's k
(here a logistic step at k, below). The adapter was trained on the groups' sampler (JTT: the inferred minority
holds `jtt_fraction` of each prompt's mass). So:

1. target rate r*: re-score training samples with fresh noise (a uniform subset per prompt, which also gives the
   per-prompt median and MAD, plus every inferred sample) and take the flag rate under the sampler's weights:
   r*_p = (sum over the inferred rows of weight * flag + the other rows' mass * their flag rate) / the prompt's mass;
   for JTT that is f * (flag rate of the inferred set) + (1 - f) * (flag rate of the rest). Weighing by the
   sampler, not by f, keeps r* right for groups with a second split (bench/two_attr_twosplit.py: the first split's
   detector rarely flags the second split's rows, and counting them at f gave r* 0.18 and w 0.68). Fresh noise
   makes r* count the detector's own misses, just as it will miss on generated samples.
2. r(w): sample N images per prompt at adapter weight w and the CFG scale (own seed, never the evaluation's), score
   their final latents the same way, flag rate against a cut centred on the base model's own samples: the
   per-prompt median of the samples at w = 0 (same seed and count), with the training rows' MAD and k (`centred`).
   The base model's samples score lower than training images (shapes-habitats: its minority at w = 0 is flagged at
   0.05 against the training cut, the training minority at 0.13-0.17), so read against the training rows' cut the
   adapter's minority samples were flagged less often than the inferred rows r* counts, and the rule overshot the
   balance (shapes-habitats majority share 0.41-0.43; `centre="training"`, the rule before the base centre).
3. w: r(w) rises with w; bracket r* on [0, max_weight] (regula falsi, a few evaluations), then read w off a
   quadratic through the tried weights (r(w) is curved: concave on colored-digits, convex on shapes-habitats, and a
   chord between two of them misses the crossing by up to 0.04 in w), or off the chord when fewer than three.

The weight is an estimate from random samples; three of its noise sources are cut without moving what it
estimates much. The detector scores each generated sample with `pairs` = 4 independent antithetic pairs (each the
groups' one-pair detector) and the reference rows with more when the inferred rows are few (`reference_pairs`:
shapes-habitats' 30 get 8, colored-digits' 98 keep 4); every pair is read against one per-prompt median / MAD (each
pair's fit, averaged), so r* and r(w) share their cut whatever their pairs; and a pair's flag is a logistic step
of its robust z at k of width 0.5 (`flag_width`; 0: the hard cut z > k), so a score near the cut counts by how
near it is. The generated samples start in antithetic pairs (`antithetic_latents`). One pair, the hard cut,
independent samples and the training rows' cut give the rule before 2026-12-05 bit for bit. Measured
(bench/results/calibration_flag_step.json, calibration_base_centred.json, debiasing.md): with the training cut,
shapes-habitats w 1.387 +- 0.020 over six calibration seeds, colored-digits 1.347 +- 0.029 (the rule before:
1.361 +- 0.111); with the base centre, the same adapters' weights fall by 0.04-0.09 at CFG 3 and 0.14 at CFG
7.5 (shapes-habitats 1.337, cut -90.9 +- 3.4 % instead of -82.5 +- 2.5 %; colored-digits 1.265, every prompt's
majority share 0.39-0.66; styled-digits 1.217, stroke -52.5 +- 1.0 % instead of -51.1 +- 1.7 %), for one more
sampling pass a CFG scale (54-68 s a calibration instead of 43-54 s). Averaging the score over 8 draws instead (one
flag per sample, on a less noisy score) moved the z > k cut's operating point: on shapes-habitats it chose w
1.58-1.62 and reversed the bias.

Nothing here reads an attribute column. Adapters trained without inferred groups (erm, paper, oracle) have no
detector to reuse; `recorded_weight` falls back to the recipe's `recommended_weight` for them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import InvdiffError
from .defaults import (CALIBRATION_CENTRE, CALIBRATION_FLAG_WIDTH, CALIBRATION_INFERRED_SCORINGS,
                       CALIBRATION_MIN_SAMPLES, CALIBRATION_PAIRS, CALIBRATION_PER_PROMPT)
from .grouper import check_groups_match, prompt_median_mad, robust_z

RULE = "contrast-flag-rate"
CENTRES = ("base", "training")  # where the generated samples' cut is centred: the base model's samples, the rows'


@dataclass(frozen=True)
class CalibrateConfig:
    guidance_scales: tuple[float, ...] = (3.0,)
    per_prompt: int = CALIBRATION_PER_PROMPT  # generated samples per prompt at each tried weight
    pairs: int = CALIBRATION_PAIRS  # the detector's antithetic pairs per generated sample
    inferred_scorings: int = CALIBRATION_INFERRED_SCORINGS  # the reference's pairs: see reference_pairs
    flag_width: float = CALIBRATION_FLAG_WIDTH  # a pair's flag: sigmoid((z - k) / width); 0: the hard cut z > k
    centre: str = CALIBRATION_CENTRE  # the generated samples' cut: CENTRES (scale_weight)
    paired: bool = True  # generated samples start in antithetic pairs (antithetic_latents; False: independent)
    min_samples: int = CALIBRATION_MIN_SAMPLES  # ... raised so that every tried weight sees this many in all
    reference_per_prompt: int = 64  # uniform training subset per prompt (median / MAD and the majority's rate)
    steps: int = 25  # DDIM steps of the calibration samples
    seed: int = 1000  # sampling and scoring seed (the evaluation uses its own)
    max_weight: float = 4.0
    max_evals: int = 3  # weights tried per CFG scale (a linear bracket, then one refinement)
    batch_size: int = 128


@dataclass
class Detector:
    """The groups' score (contrast or classifier): band, k, and the per-prompt median / MAD of the training log
    score (each the mean over the reference's pairs of that pair's fit: one cut for every number of pairs). A
    sample is scored with `pairs` independent antithetic pairs (pair 0 draws what the groups' one pair drew before);
    its flag is the mean of its pairs' flags, each a step of its robust z at k (`step`)."""

    unet: torch.nn.Module
    scheduler: object
    band: tuple[int, int]
    k: float
    text: torch.Tensor  # [P,L,D]
    uncond: torch.Tensor  # [1,L,D]
    median: torch.Tensor | None = None  # [P]
    mad: torch.Tensor | None = None  # [P]
    score: str = "contrast"  # the groups' band score (losses.SCORES)
    pairs: int = CALIBRATION_PAIRS
    width: float = 0.0  # the flag's step width in robust-z units (0: the hard cut z > k)

    def log_score(self, latents: torch.Tensor, prompt_ids: torch.Tensor, seed: int, batch_size: int,
                  pairs: int | None = None) -> torch.Tensor:
        """[pairs, N]: each pair's log score (pair j draws with `pair_seed(seed, j)`; `pairs` defaults to the
        detector's)."""
        return torch.stack([self.pair_log_score(latents, prompt_ids, pair_seed(seed, j), batch_size)
                            for j in range(pairs or self.pairs)])

    def pair_log_score(self, latents: torch.Tensor, prompt_ids: torch.Tensor, seed: int,
                       batch_size: int) -> torch.Tensor:
        from .losses import ProfileConfig, ScoreInputs, band_score

        inputs = ScoreInputs(latents, prompt_ids, self.text, self.uncond)
        config = ProfileConfig(score=self.score)  # one antithetic pair, as the groups' default profile
        score = band_score(self.unet, self.scheduler, inputs, self.band, config, seed, batch_size)
        return score.clamp_min(1e-12).log()

    def fit(self, log_score: torch.Tensor, prompt_ids: torch.Tensor, n_prompts: int) -> None:
        """The per-prompt median and MAD from reference rows' `log_score` [pairs, N]: each pair's, averaged."""
        fits = [prompt_median_mad(row, prompt_ids, n_prompts) for row in log_score]
        self.median = torch.stack([m for m, _ in fits]).mean(0)
        self.mad = torch.stack([d for _, d in fits]).mean(0)

    def flags(self, log_score: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        """float64 [N] in [0, 1]: the mean over a sample's pairs of the step of their robust z."""
        return torch.stack([self.step(robust_z(row, self.median, self.mad, prompt_ids)) for row in log_score]).mean(0)

    def step(self, z: torch.Tensor) -> torch.Tensor:
        """A pair's flag: z > k, or with a width the logistic step sigmoid((z - k) / width) (float64)."""
        z = z.double()
        return (z > self.k).double() if self.width <= 0 else torch.sigmoid((z - self.k) / self.width)


def pair_seed(seed: int, pair: int) -> int:
    """The scoring seed of the detector's pair `pair`: pair 0 keeps `seed` (the single pair the rule drew until
    2026-12-05: `pairs=1` with independent samples gives its weights), the others step away from every seed the
    rule uses."""
    return seed + PAIR_SEED_STEP * pair


PAIR_SEED_STEP = 100_003


def make_detector(model, inputs, groups_meta: dict, config: CalibrateConfig) -> Detector:
    from .losses import make_noise_scheduler

    profile = groups_meta.get("profile", {})
    if profile.get("source") != "inferred" or groups_meta.get("recipe") != "invdiff-rt":
        raise InvdiffError("--groups: calibration reuses the score of `invdiff groups --recipe invdiff-rt`; "
                           "pass those groups (or give --adapter-weight by hand)")
    band = tuple(int(b) for b in profile["band"])
    return Detector(model.unet.eval().requires_grad_(False), make_noise_scheduler(model), band,
                    float(profile.get("outlier_k", 3.0)), inputs.text_embeddings, inputs.uncond_embedding,
                    score=profile.get("score", "contrast"), pairs=config.pairs, width=config.flag_width)


def reference_subset(prompt_ids: torch.Tensor, inferred: torch.Tensor, per_prompt: int,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uniform subset: up to `per_prompt` random rows of each prompt, every inferred row), both sorted."""
    g = torch.Generator().manual_seed(seed)
    uniform = []
    for p in prompt_ids.unique():
        rows = (prompt_ids == p).nonzero().flatten()
        uniform.append(rows[torch.randperm(rows.numel(), generator=g)[:per_prompt]])
    return torch.cat(uniform).sort().values, inferred.nonzero().flatten()


def target_rate(flag_u: torch.Tensor, pid_u: torch.Tensor, inferred_u: torch.Tensor, flag_i: torch.Tensor,
                pid_i: torch.Tensor, weight_i: torch.Tensor, rest_mass: torch.Tensor, n_prompts: int) -> float:
    """Mean over prompts of the flag rate under the groups' sampler: every inferred row at its sampling weight
    `weight_i`, the other rows (`rest_mass[p]` in all, one weight each within a prompt under the JTT and the raked
    samplers) at the flag rate of the uniform subset's non-inferred rows."""
    rates = []
    for p in range(n_prompts):
        rest = flag_u[(pid_u == p) & ~inferred_u].double()
        mine, w = flag_i[pid_i == p].double(), weight_i[pid_i == p].double()
        if not rest.numel() and not mine.numel():
            continue
        mass, rest_rate = (float(rest_mass[p]), rest.mean()) if rest.numel() else (0.0, 0.0)
        rates.append(((mine * w).sum() + mass * rest_rate) / (w.sum() + mass))
    return float(torch.stack(rates).mean())


def reference_pairs(config: CalibrateConfig, n_inferred: int) -> int:
    """The reference's detector pairs: `pairs`, raised until the inferred rows get `inferred_scorings` scorings in
    all (at most MAX_REFERENCE_PAIRS). r* is mostly the inferred rows' flag rate, and they are few (shapes-habitats:
    30, 4 of them for one prompt; colored-digits 98), so their scoring noise moved w more than the samples' did."""
    needed = -(-config.inferred_scorings // n_inferred) if n_inferred else 0
    return max(config.pairs, min(needed, MAX_REFERENCE_PAIRS))


MAX_REFERENCE_PAIRS = 16


def reference_flags(detector: Detector, inputs, grouping,
                    config: CalibrateConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Set the detector's per-prompt median / MAD from re-scored training samples (the uniform subset); return the
    flags of the reference rows, the uniform subset's then every inferred row's, and those two row sets."""
    uniform, inferred = reference_subset(inputs.prompt_ids, grouping.inferred, config.reference_per_prompt,
                                         config.seed)
    rows = torch.cat([uniform, inferred])
    scores = detector.log_score(inputs.latents[rows], inputs.prompt_ids[rows], config.seed, config.batch_size,
                                reference_pairs(config, inferred.numel()))
    detector.fit(scores[:, :uniform.numel()], inputs.prompt_ids[uniform], len(inputs.prompts))
    return detector.flags(scores, inputs.prompt_ids[rows]), uniform, inferred


def fit_reference(detector: Detector, inputs, grouping, config: CalibrateConfig) -> float:
    """Set the detector's per-prompt median / MAD from re-scored training samples; return the target rate r*."""
    flags, uniform, inferred = reference_flags(detector, inputs, grouping, config)
    n_u, n_prompts = uniform.numel(), len(inputs.prompts)
    rest = ~grouping.inferred
    rest_mass = torch.zeros(n_prompts, dtype=torch.float64).index_add_(0, inputs.prompt_ids[rest],
                                                                       grouping.sampling[rest].double())
    return target_rate(flags[:n_u], inputs.prompt_ids[uniform], grouping.inferred[uniform], flags[n_u:],
                       inputs.prompt_ids[inferred], grouping.sampling[inferred], rest_mass, n_prompts)


def antithetic_latents(seed: int, prompt: str, index: int, shape) -> torch.Tensor:
    """The sampler's initial latents for even indices; an odd index starts from its even neighbour's, negated.
    Each sample is still N(0, I), so the expected flag rate is unchanged, and a pair's two samples fall on
    opposite sides more often than two independent ones: with the scoring noise averaged out (8 draws a sample),
    the colored-digits demo's weight had sd 0.035 over six calibration seeds with the pairs, 0.071 without."""
    from ..runtime.sampling import initial_latents

    x = initial_latents(seed, prompt, index - index % 2, shape)
    return -x if index % 2 else x


def sample_latents(model, adapter, prompts: list[str], per_prompt: int, seed: int, steps: int,
                   guidance_scale: float, weight: float, batch_size: int, paired: bool = True) -> torch.Tensor:
    """Final latents of `per_prompt` samples of each prompt (the sampler's DDIM loop; from `antithetic_latents`
    when `paired`, else from the sampler's own initial latents).
    The chunks of `batch_size` samples run in single-threaded workers side by side (`map_batches`: on 2 cores 25 %
    faster than one after the other on two threads; the latents differ by <= 2e-6, the flag rates not at all)."""
    from ..parallel import map_batches
    from ..runtime.backends.torch_backend import TorchRuntime
    from ..runtime.sampling import cfg_embeddings, denoise, initial_latents, make_scheduler

    runtime, cache = TorchRuntime(model, adapter), {}
    start_of = antithetic_latents if paired else initial_latents
    cfg_embeddings(runtime, prompts, guidance_scale, cache)  # every prompt encoded once: the workers only read it
    jobs = [(p, i) for p in prompts for i in range(per_prompt)]

    def one_chunk(start: int) -> torch.Tensor:
        chunk = jobs[start:start + batch_size]
        with torch.no_grad():  # grad mode is per thread: set in the worker
            x = torch.stack([start_of(seed, p, i, runtime.latent_shape) for p, i in chunk])
            emb = cfg_embeddings(runtime, [p for p, _ in chunk], guidance_scale, cache)
            sched = make_scheduler(runtime.scheduler_config, "ddim")
            return denoise(runtime, sched, x, emb, guidance_scale, weight, steps).float()

    return torch.cat(map_batches(one_chunk, range(0, len(jobs), batch_size)))


def samples_per_prompt(config: CalibrateConfig, n_prompts: int) -> int:
    """`per_prompt`, raised to reach `min_samples` in all (shapes-habitats has 2 prompts: 16 each gave a flag
    rate in steps of 1/32 and a weight of 2.5 that reversed the bias; with 80 each, two 3,000-step adapters got
    1.534 / 1.568 and overshot (majority share 0.42 / 0.41); 240 each, as many samples as colored-digits' 10 x 48)."""
    return max(config.per_prompt, -(-config.min_samples // max(n_prompts, 1)))


def sample_scores(detector: Detector, model, adapter, inputs, config: CalibrateConfig, guidance_scale: float,
                  weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log score [pairs, N], prompt ids [N]) of the adapter's samples at `weight` and the CFG scale."""
    n = samples_per_prompt(config, len(inputs.prompts))
    latents = sample_latents(model, adapter, inputs.prompts, n, config.seed, config.steps,
                             guidance_scale, weight, config.batch_size, config.paired)
    pids = torch.arange(len(inputs.prompts)).repeat_interleave(n)
    return detector.log_score(latents, pids, config.seed + 1, config.batch_size), pids


def flag_rate(detector: Detector, model, adapter, inputs, config: CalibrateConfig, guidance_scale: float,
              weight: float) -> float:
    """r(w) against the detector's own cut (the training rows': bench/detector_rate.py's diagnosis)."""
    return float(detector.flags(*sample_scores(detector, model, adapter, inputs, config, guidance_scale,
                                                weight)).mean())


def centred(detector: Detector, log_score: torch.Tensor, prompt_ids: torch.Tensor, n_prompts: int) -> Detector:
    """The detector with its per-prompt median moved to that of `log_score` (the base model's own samples: each
    pair's median, averaged, as `Detector.fit`); the training rows' MAD, k and flag step kept."""
    base = replace(detector)
    base.fit(log_score, prompt_ids, n_prompts)
    return replace(detector, median=base.median)


def scale_weight(detector: Detector, model, adapter, inputs, target: float, config: CalibrateConfig,
                 guidance_scale: float) -> tuple[float, list[tuple[float, float]]]:
    """`search_weight` at one CFG scale. With `centre` "base" the generated samples are read against the cut
    `centred` on the samples at w = 0 (the same draws, so r(0) costs nothing more); with "training", against the
    training rows' cut."""
    draw = lru_cache(maxsize=None)(lambda w: sample_scores(detector, model, adapter, inputs, config,
                                                           guidance_scale, w))
    cut = centred(detector, *draw(0.0), len(inputs.prompts)) if config.centre == "base" else detector
    return search_weight(lambda w: float(cut.flags(*draw(w)).mean()), target, config)


def next_weight(tried: list[tuple[float, float]], target: float, max_weight: float) -> float | None:
    """The next weight to try, or None when r* is bracketed by neighbours (or out of reach)."""
    below = [(w, r) for w, r in tried if r < target]
    above = [(w, r) for w, r in tried if r >= target]
    if not above:
        top = max(w for w, _ in tried)
        return None if top >= max_weight else min(2 * top, max_weight)
    if not below:
        return 0.0 if min(w for w, _ in tried) > 0 else None
    return interpolate(tried, target)


def interpolate(tried: list[tuple[float, float]], target: float) -> float:
    """Linear interpolation between the closest tried weights on either side of r* (or the nearest end)."""
    below = [(w, r) for w, r in tried if r < target]
    above = [(w, r) for w, r in tried if r >= target]
    if not above:
        return max(below)[0]
    if not below:
        return min(above)[0]
    (w0, r0), (w1, r1) = max(below), min(above)
    return w0 + (w1 - w0) * (target - r0) / max(r1 - r0, 1e-9)


def estimate(tried: list[tuple[float, float]], target: float) -> float:
    """Where r(w) = r*: the root of a quadratic least-squares fit through three or more tried weights that lies
    between the bracketing neighbours; else (fewer points, no bracket, no such root) `interpolate`."""
    import numpy as np

    chord = interpolate(tried, target)
    below = [w for w, r in tried if r < target]
    above = [w for w, r in tried if r >= target]
    if len(tried) < 3 or not below or not above:
        return chord
    w, r = np.array(tried, dtype=np.float64).T
    roots = np.roots(np.polyfit(w, r, 2) - np.array([0.0, 0.0, target]))
    inside = [x.real for x in roots if abs(x.imag) < 1e-12 and max(below) <= x.real <= min(above)]
    return float(inside[0]) if len(inside) == 1 else chord


def search_weight(rate, target: float, config: CalibrateConfig) -> tuple[float, list[tuple[float, float]]]:
    """Regula falsi over w with `rate(w)`, starting at w = 1 (the trained weight); at most `max_evals` calls; the
    weight is `estimate` over every tried weight."""
    tried = [(1.0, rate(1.0))]
    while len(tried) < config.max_evals:
        w = next_weight(tried, target, config.max_weight)
        if w is None or any(abs(w - v) < 0.05 for v, _ in tried):
            break
        tried.append((round(w, 3), rate(round(w, 3))))
    return round(estimate(tried, target), 3), sorted(tried)


def calibrate(model, adapter, inputs, groups, config: CalibrateConfig = CalibrateConfig()) -> dict:
    """The calibration record for adapter.json: rule, target rate and, per CFG scale, the weight and its evidence."""
    start = time.perf_counter()
    detector = make_detector(model, inputs, groups.meta, config)
    target = fit_reference(detector, inputs, groups.grouping, config)
    table = {}
    for scale in config.guidance_scales:
        weight, tried = scale_weight(detector, model, adapter, inputs, target, config, scale)
        table[f"{scale:g}"] = {"weight": weight, "tried": [[w, round(r, 4)] for w, r in tried]}
    return {"rule": RULE, "target_rate": round(target, 4), "by_guidance_scale": table,
            "per_prompt": samples_per_prompt(config, len(inputs.prompts)), "pairs": config.pairs,
            "reference_pairs": reference_pairs(config, int(groups.grouping.inferred.sum())),
            "flag_width": config.flag_width, "centre": config.centre, "paired": config.paired, "seed": config.seed,
            "steps": config.steps, "seconds": round(time.perf_counter() - start, 2)}


def recorded_weight(manifest: dict, guidance_scale: float) -> tuple[float, str]:
    """The weight to sample with when --adapter-weight is not given, and a sentence saying how it was chosen."""
    table = (manifest.get("calibration") or {}).get("by_guidance_scale", {})  # None: an uncalibrated adapter
    if table:
        scale = min(table, key=lambda s: abs(float(s) - guidance_scale))
        w = float(table[scale]["weight"])
        how = "calibrated label-free" + ("" if abs(float(scale) - guidance_scale) < 1e-6 else
                                         f" at the nearest calibrated CFG scale {scale}, not {guidance_scale:g}")
        return w, f"{how} (rule {RULE}, adapter.json)" + unbracketed_note(manifest["calibration"], scale)
    w = manifest.get("recommended_weight")
    w = 1.0 if w is None else float(w)
    return w, f"the recipe's recorded default (not calibrated; recipe {manifest.get('recipe', '?')})"


def unbracketed_note(record: dict, scale: str) -> str:
    """'' when the tried weights' flag rates straddle the target; else a warning: the weight is the search's end."""
    rates = [r for _, r in record["by_guidance_scale"][scale].get("tried", [])]
    target = record.get("target_rate")
    if target is None or not rates or (min(rates) < target <= max(rates)):
        return ""
    side = "over" if min(rates) >= target else "under"
    return (f"; WARNING: the flag rate stayed {side} the target {target:g} at every tried weight, so the weight is "
            "the search's end: check the groups, or pass --adapter-weight")


def resolve_weight(adapter_weight: float | None, guidance_scale: float, adapter_dir=None,
                   export_dir=None) -> tuple[float, str]:
    """--adapter-weight when given, else the weight recorded with the adapter (its folder or an export of it)."""
    info = _adapter_info(adapter_dir, export_dir)
    if info is None:
        return (1.0 if adapter_weight is None else float(adapter_weight)), "no adapter (the weight has no effect)"
    w, how = (float(adapter_weight), "given by --adapter-weight") if adapter_weight is not None else \
        recorded_weight(info, guidance_scale)
    if info.get("from_t"):
        how += f"; the adapter acts at t >= {info['from_t']} (adapter.json from_t)"
    return w, how


def _adapter_info(adapter_dir, export_dir) -> dict | None:
    """The adapter's manifest (its folder), or what an export recorded of it; None without an adapter."""
    if adapter_dir is not None:
        from .adapter import read_adapter_manifest

        return read_adapter_manifest(adapter_dir)
    if export_dir is not None:
        from ..export.manifest import read_manifest

        return read_manifest(export_dir, verify=False).get("adapter") or None
    return None


def calibrates(recipe: str, groups) -> bool:
    """Whether an adapter has a detector to calibrate with: invdiff-rt recipe and groups inferred by it."""
    meta = getattr(groups, "meta", None) or {}
    return recipe == "invdiff-rt" and meta.get("recipe") == "invdiff-rt" and \
        meta.get("profile", {}).get("source") == "inferred"


def check_calibratable(manifest: dict, groups, adapter_dir, groups_prefix) -> None:
    """`invdiff calibrate`'s inputs fit: an invdiff-rt adapter trained on inferred groups, these groups (the rule
    reads their detector and target rate); else one line naming the flag."""
    recipe, source = manifest.get("recipe"), manifest.get("groups_source")
    if recipe != "invdiff-rt" or source != "inferred":
        raise InvdiffError(f"--adapter {adapter_dir}: trained with recipe {recipe} on groups {source}; the label-free "
                           "weight is for invdiff-rt adapters on inferred groups (give others --adapter-weight)")
    if manifest.get("groups_fingerprint") != groups.fingerprint:
        raise InvdiffError(f"--groups {groups_prefix}: the adapter was trained on other groups "
                           f"({str(manifest.get('groups_fingerprint'))[:12]}, these are {groups.fingerprint[:12]}); "
                           "pass the groups it was trained with")
    _check_listed_rows(manifest.get("second_split") or {}, len(groups.grouping.weights), adapter_dir)


def _check_listed_rows(test: dict, rows: int, adapter_dir) -> None:
    """The second split's listed rows (`splits.trained_splits`) are rows of the groups' data."""
    from .adapter import LISTED_ROWS

    for key in LISTED_ROWS:
        past = [r for r in test.get(key, []) if r >= rows]
        if past:
            raise InvdiffError(f"--adapter {adapter_dir}: adapter.json's second_split.{key} lists row {past[0]}, "
                               f"past the data's {rows} rows; restore its adapter.json or train it again")


def calibrate_adapter(model, adapter_dir, inputs, groups, config: CalibrateConfig = CalibrateConfig()) -> dict:
    """Calibrate the adapter in `adapter_dir` and record the result in its adapter.json (atomically)."""
    from .. import artifacts
    from .adapter import MANIFEST_NAME, load_adapter, read_adapter_manifest

    from .splits import as_trained

    adapter = load_adapter(adapter_dir, model)
    manifest = read_adapter_manifest(adapter_dir)
    check_groups_match(groups, inputs)
    record = calibrate(model, adapter, inputs, as_trained(groups, manifest, inputs.prompt_ids), config)
    previous = manifest.get("calibration") or {}
    keys = record.keys() - {"by_guidance_scale", "seconds"}  # the record's fields describe every scale in its table
    same = all(previous.get(k) == record[k] for k in keys)
    old = previous.get("by_guidance_scale", {}) if same else {}
    record["by_guidance_scale"] = {**old, **record["by_guidance_scale"]}
    artifacts.atomic_write_json(Path(adapter_dir) / MANIFEST_NAME, {**manifest, "calibration": record})
    return record
