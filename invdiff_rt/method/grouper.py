"""Group inference from per-sample losses (label-free), plus the hidden-column diagnostics.

* `paper`: the published EIIL-style soft grouper: W [N,G] ~ U(0,1), Adam lr 0.01, 500 full-batch steps maximising
  the std of the soft group-mean losses, rows clipped at 0 and renormalised after every step.
* `invdiff-rt`: a per-prompt robust outlier split (score = per-prompt robust z of the log loss, z = (x - median) /
  (1.4826 MAD); minority = z > 3) with JTT-style sampling weights that give the inferred minority half of each
  prompt's sampling mass; two one-hot groups (0 = majority, 1 = inferred minority). It also records a candidate
  second split (`splits.py`: a second attribute's minority), which `invdiff train` tests and may add.
* `erm`: one group, uniform sampling.
* oracle groups (comparison only) from one hidden column, or from several (one group per combination of flags, and a
  raked sampler that balances each attribute's minority on its own).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import artifacts
from ..errors import InvdiffError
from ..parallel import one_torch_thread

MAD_TO_SD = 1.4826  # MAD of a normal distribution times this = its standard deviation


def project_rows(weights: torch.Tensor) -> torch.Tensor:
    """The paper's constraint: clip at 0, then divide each row by its sum (an all-zero row becomes uniform)."""
    w = weights.clamp_min(0)
    total = w.sum(dim=1, keepdim=True)
    uniform = torch.full_like(w, 1.0 / w.shape[1])
    return torch.where(total > 0, w / total.clamp_min(1e-12), uniform)


def soft_group_means(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (weights * losses[:, None]).sum(dim=0) / weights.sum(dim=0).clamp_min(1e-12)


def paper_soft_grouper(losses: torch.Tensor, groups: int = 4, seed: int = 0, iters: int = 500, lr: float = 0.01,
                       min_weight_coef: float = 0.0) -> torch.Tensor:
    """Fit W [N,G] maximising std_g of the soft group means (minus c * min_ig l_i W_ig, c=0 as released)."""
    losses = losses.detach().float().clone()  # a normal tensor even when computed under inference_mode
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(losses.shape[0], groups, generator=gen).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    with one_torch_thread():  # tiny tensor ops: thread hand-offs cost more than they save (8x on 2 cores)
        _fit(losses, w, opt, iters, min_weight_coef)
    return w.detach()


def _fit(losses: torch.Tensor, w: torch.Tensor, opt: torch.optim.Optimizer, iters: int, coef: float) -> None:
    for _ in range(iters):
        objective = -soft_group_means(losses, w).std(unbiased=True)
        if coef:
            objective = objective - coef * (losses[:, None] * w).min()
        opt.zero_grad()
        objective.backward()
        opt.step()
        with torch.no_grad():
            w.copy_(project_rows(w))


def prompt_median_mad(x: torch.Tensor, prompt_ids: torch.Tensor, n_prompts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt median and MAD of x [N] (float64 [n_prompts]; prompts without samples: 0 and 1)."""
    median, mad = torch.zeros(n_prompts, dtype=torch.float64), torch.ones(n_prompts, dtype=torch.float64)
    for p in prompt_ids.unique().tolist():
        values = x[prompt_ids == p]
        median[p] = values.median()
        mad[p] = (values - median[p]).abs().median()
    return median, mad


def robust_z(x: torch.Tensor, median: torch.Tensor, mad: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
    """(x - median) / (1.4826 * MAD) with each row's own prompt's median and MAD; 0 where that MAD is 0 (one or two
    rows, or ties: no spread to call an outlier against; with two rows the median is the lower one and the other
    row's z was about 1e10, always in the minority)."""
    spread = mad[prompt_ids] * MAD_TO_SD
    return torch.where(spread > 0, (x - median[prompt_ids]) / spread.clamp_min(1e-300), 0.0)


def robust_prompt_z(scores: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
    """Per-prompt robust z-score of log(score), the medians and MADs taken within each prompt."""
    x = scores.double().clamp_min(1e-12).log()
    return robust_z(x, *prompt_median_mad(x, prompt_ids, int(prompt_ids.max()) + 1), prompt_ids).float()


def outlier_split(z: torch.Tensor, k: float = 3.0) -> torch.Tensor:
    """Inferred minority: robust z above k (median + k MAD-sd)."""
    return z > k


def jtt_sampling_weights(minority: torch.Tensor, prompt_ids: torch.Tensor, fraction: float = 0.5) -> torch.Tensor:
    """Per-sample sampling weights giving the inferred minority `fraction` of each prompt's sampling mass.

    The prompt's total mass is kept (= its sample count), so prompt frequencies are unchanged. Prompts with no
    inferred minority (or only minority) keep uniform weights.
    """
    s = torch.ones(minority.shape[0], dtype=torch.float64)
    _balance(s, minority, prompt_ids, fraction)
    return s.float()


def raked_sampling_weights(flags: torch.Tensor, prompt_ids: torch.Tensor, fraction: float = 0.5,
                           passes: int = 100) -> torch.Tensor:
    """Sampling weights that give each attribute's minority (flags [N,A]) `fraction` of every prompt's mass at once.

    Raking (iterative proportional fitting): the JTT rescaling of one attribute after the other until every
    attribute's share holds; one attribute is one pass of `jtt_sampling_weights`. Prompt masses are kept.
    """
    s = torch.ones(flags.shape[0], dtype=torch.float64)
    for _ in range(passes if flags.shape[1] > 1 else 1):
        for a in range(flags.shape[1]):
            _balance(s, flags[:, a], prompt_ids, fraction)
    return s.float()


def _balance(s: torch.Tensor, minority: torch.Tensor, prompt_ids: torch.Tensor, fraction: float) -> None:
    """Rescale s in place so that, within every prompt holding both, the minority rows carry `fraction` of its mass."""
    for p in prompt_ids.unique():
        sel = prompt_ids == p
        total, part = s[sel].sum(), s[sel & minority].sum()
        if 0 < part < total:
            s[sel & minority] *= fraction * total / part
            s[sel & ~minority] *= (1 - fraction) * total / (total - part)


def one_hot_groups(minority: torch.Tensor) -> torch.Tensor:
    """[N,2]: column 0 = majority, column 1 = (inferred) minority."""
    m = minority.float()
    return torch.stack([1 - m, m], dim=1)


def effective_weights(weights: torch.Tensor, sampling: torch.Tensor) -> torch.Tensor:
    """Expected share of the objective carried by each sample under group-balanced means and the sampler.

    eff_i = (1/G) sum_g s_i W_ig / sum_j s_j W_jg over groups with mass; sums to 1.
    """
    mass = (sampling[:, None] * weights).sum(dim=0)
    present = mass > 0
    share = sampling[:, None] * weights[:, present] / mass[present]
    return share.sum(dim=1) / int(present.sum())


def prompt_minority(values: list, prompt_ids: torch.Tensor) -> torch.Tensor:
    """Per-prompt minority flag from a hidden column: value != the most common value among that prompt's samples."""
    flags = torch.zeros(len(values), dtype=torch.bool)
    for p in prompt_ids.unique().tolist():
        idx = (prompt_ids == p).nonzero().flatten().tolist()
        vals = [str(values[i]) for i in idx]
        majority = max(sorted(set(vals)), key=vals.count)
        for i, v in zip(idx, vals):
            flags[i] = v != majority
    return flags


def inferred_minority(weights: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """The inferred set of a soft grouping: samples whose argmax group is the highest-mean-loss group."""
    top = int(soft_group_means(losses, weights).argmax())
    return weights.argmax(dim=1) == top


def auroc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie-averaged ranks); nan when one class is empty."""
    n_pos, n = int(positive.sum()), positive.numel()
    if n_pos in (0, n):
        return float("nan")
    values, inverse, counts = score.double().unique(return_inverse=True, return_counts=True)
    avg_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2
    rank_sum = avg_rank[inverse][positive].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos))


def group_diagnostics(score: torch.Tensor, inferred: torch.Tensor, weights: torch.Tensor, sampling: torch.Tensor,
                      minority: torch.Tensor) -> dict:
    """AUROC of `score` vs the true minority, precision/recall of the inferred set, minority effective weight."""
    tp = int((inferred & minority).sum())
    return {
        "auroc": None if minority.all() or not minority.any() else auroc(score, minority),  # JSON has no nan
        "precision": tp / max(int(inferred.sum()), 1),
        "recall": tp / max(int(minority.sum()), 1),
        "inferred_size": int(inferred.sum()),
        "minority_size": int(minority.sum()),
        "minority_effective_weight": float(effective_weights(weights, sampling)[minority].sum()),
    }


@dataclass
class Grouping:
    """What the grouper decided: W [N,G], score [N] (higher = more minority-like), sampling weights [N]."""

    weights: torch.Tensor
    score: torch.Tensor
    sampling: torch.Tensor
    inferred: torch.Tensor
    info: dict = field(default_factory=dict)
    candidate: torch.Tensor | None = None  # bool [N]: a candidate second split (splits.py), or None
    flags: torch.Tensor | None = None  # bool [N,A]: oracle groups' hidden minority flags, one column per attribute


def group_paper(losses: torch.Tensor, groups: int, seed: int, iters: int = 500) -> Grouping:
    w = paper_soft_grouper(losses, groups=groups, seed=seed, iters=iters)
    means = soft_group_means(losses, w)
    return Grouping(w, w @ means, torch.ones(losses.shape[0]), inferred_minority(w, losses),
                    {"group_mean_losses": means.tolist()})


def group_robust(scores: torch.Tensor, prompt_ids: torch.Tensor, k: float = 3.0, fraction: float = 0.5) -> Grouping:
    z = robust_prompt_z(scores, prompt_ids)
    minority = outlier_split(z, k)
    w = one_hot_groups(minority)
    return Grouping(w, z, jtt_sampling_weights(minority, prompt_ids, fraction), minority,
                    {"group_mean_losses": soft_group_means(scores.float(), w).tolist(), "mad_k": k,
                     "jtt_fraction": fraction})


def group_from_flags(minority: torch.Tensor, prompt_ids: torch.Tensor, recipe: str) -> Grouping:
    """Oracle groups from hidden columns (comparison only): minority flags [N] or [N,A] (one column per attribute).

    One attribute: majority / minority. Several: one group per combination of flags that occurs (cell), and for
    invdiff-rt the raked sampler, which gives every attribute's minority half of each prompt's mass.
    """
    flags = minority if minority.dim() == 2 else minority[:, None]
    if flags.shape[1] == 1:
        w = one_hot_groups(flags[:, 0])
    else:
        cells = (flags.long() * (2 ** torch.arange(flags.shape[1]))).sum(1)
        w = torch.nn.functional.one_hot(cells.unique(return_inverse=True)[1]).float()
    sampling = raked_sampling_weights(flags, prompt_ids) if recipe == "invdiff-rt" else torch.ones(len(flags))
    inferred = flags.any(1)
    return Grouping(w, inferred.float(), sampling, inferred, {"attributes": flags.shape[1]} if flags.shape[1] > 1
                    else {}, flags=flags.bool())


def clamped_share(share: float, n: int) -> float:
    """A share read off n samples, kept half a sample from 0 and 1 (its log-odds stay finite in the prior)."""
    return min(max(share, 0.5 / n), 1 - 0.5 / n)


def sampler_prior(minority: torch.Tensor, prompt_ids: torch.Tensor, majority_share: list) -> torch.Tensor:
    """[N] row weights of what the guided base draws relative to the data (`targets.Posterior`'s prior): each
    prompt's majority rows at q / (data majority share), its minority rows at (1 - q) / (data minority share), for
    q = `majority_share[prompt id]` (e.g. 0.98 drawn where the data has 0.95); a prompt without minority rows
    keeps 1. Several attributes (minority [N,A], one list of shares per attribute): the product of each attribute's
    weights, as if the base drew the attributes independently given the prompt, rescaled to mean 1 over each prompt's
    rows (each prompt keeps its data share; where the data holds the attributes independently it is already 1)."""
    if minority.dim() == 2:
        product = torch.stack([sampler_prior(minority[:, a], prompt_ids, q)
                               for a, q in enumerate(majority_share)]).prod(0)
        means = torch.zeros(int(prompt_ids.max()) + 1).index_add_(0, prompt_ids, product) / torch.bincount(prompt_ids)
        return product / means[prompt_ids]
    prior = torch.ones(len(prompt_ids))
    for p, q in enumerate(majority_share):
        rows = prompt_ids == p
        pi = minority[rows].float().mean()
        if 0 < pi < 1:
            prior[rows & minority] = (1 - q) / pi
            prior[rows & ~minority] = q / (1 - pi)
    return prior


def group_erm(n: int) -> Grouping:
    return Grouping(torch.ones(n, 1), torch.zeros(n), torch.ones(n), torch.zeros(n, dtype=torch.bool), {})


# ---------------------------------------------------------------- the groups artifact and the `groups` stage

RECIPES = ("invdiff-rt", "paper", "erm")


def groups_paths(prefix: str | Path) -> tuple[Path, Path]:
    """GROUPS prefix -> (PREFIX.safetensors, PREFIX.json); a given .safetensors/.json suffix is stripped."""
    prefix = Path(prefix)
    if prefix.suffix in (".safetensors", ".json"):
        prefix = prefix.with_suffix("")
    return prefix.with_name(prefix.name + ".safetensors"), prefix.with_name(prefix.name + ".json")


@dataclass
class GroupsResult:
    grouping: Grouping
    meta: dict

    @property
    def fingerprint(self) -> str:
        return self.meta.get("fingerprint", "")


def save_groups(result: GroupsResult, prefix: str | Path) -> tuple[Path, Path]:
    """Write PREFIX.safetensors (weights, score, sampling, inferred, and the candidate second split when there is
    one) then PREFIX.json (which hashes the former)."""
    weights_path, json_path = groups_paths(prefix)
    g = result.grouping
    tensors = {"weights": g.weights.float(), "score": g.score.float(), "sampling_weights": g.sampling.float(),
               "inferred": g.inferred.to(torch.uint8)}
    if g.candidate is not None:
        tensors["candidate"] = g.candidate.to(torch.uint8)
    artifacts.atomic_save_safetensors(tensors, weights_path, metadata={"format": artifacts.GROUPS_FORMAT})
    sha = artifacts.sha256_file(weights_path)
    meta = {**result.meta, "format": artifacts.GROUPS_FORMAT, "tensors_sha256": sha,
            "versions": artifacts.package_versions()}
    meta["fingerprint"] = artifacts.sha256_json({"tensors": sha, "recipe": meta.get("recipe"),
                                                 "data": meta.get("data_fingerprint")})
    artifacts.atomic_write_json(json_path, meta)
    result.meta = meta
    return weights_path, json_path


META_TYPES = {"grouping": dict, "profile": dict, "groups": int, "prompts": list, "recipe": str}  # what readers index


def load_groups(prefix: str | Path) -> GroupsResult:
    """Read a groups artifact; refuses a missing, foreign or mismatched (json vs tensors) pair."""
    from safetensors.torch import load_file

    weights_path, json_path = groups_paths(prefix)
    meta = artifacts.read_json(json_path, "groups manifest")
    if meta.get("format") != artifacts.GROUPS_FORMAT:
        raise InvdiffError(f"{json_path}: not an invdiff-rt groups file; make one with `invdiff groups`")
    bad = next((k for k, kind in META_TYPES.items() if k in meta and not isinstance(meta[k], kind)), None)
    if bad is not None:
        raise InvdiffError(f"{json_path}: malformed ({bad} is not a {META_TYPES[bad].__name__}); "
                           "rerun `invdiff groups`")
    if not weights_path.exists() or artifacts.sha256_file(weights_path) != meta.get("tensors_sha256"):
        raise InvdiffError(f"{weights_path}: missing or does not match {json_path.name}; rerun `invdiff groups`")
    t = load_file(str(weights_path))
    problem = _profile_problem(meta.get("profile", {})) or _tensors_problem(t)
    if problem:
        raise InvdiffError(f"{json_path}: malformed ({problem}); rerun `invdiff groups`")
    candidate = t["candidate"].bool() if "candidate" in t else None
    g = Grouping(t["weights"], t["score"], t["sampling_weights"], t["inferred"].bool(), meta.get("grouping", {}),
                 candidate)
    return GroupsResult(g, meta)


def _profile_problem(profile: dict) -> str:
    """What in an inferred profile the weight rule cannot read (`calibrate.make_detector`), or ""."""
    from .losses import NUM_TRAIN_TIMESTEPS, SCORES

    if profile.get("source") != "inferred":
        return ""
    band, k = profile.get("band"), profile.get("outlier_k", 3.0)
    if not (isinstance(band, list) and len(band) == 2 and all(isinstance(b, int) for b in band)
            and 0 <= band[0] <= band[1] < NUM_TRAIN_TIMESTEPS):
        return f"profile.band {band!r} is not two timesteps lo <= hi in 0..{NUM_TRAIN_TIMESTEPS - 1}"
    if not (isinstance(k, (int, float)) and math.isfinite(k) and k > 0):
        return f"profile.outlier_k {k!r} is not a positive number"
    if profile.get("score", "contrast") not in SCORES:
        return f"profile.score {profile.get('score')!r} is not one of {', '.join(SCORES)}"
    return ""


def _tensors_problem(t: dict) -> str:
    """What in the groups' tensors training and calibration cannot use, or ""."""
    missing = [k for k in ("weights", "score", "sampling_weights", "inferred") if k not in t]
    if missing:
        return f"no {', '.join(missing)} tensor"
    n, sampling = t["weights"].shape[0], t["sampling_weights"]
    if any(t[k].shape[0] != n or t[k].dim() != 1 for k in ("score", "sampling_weights", "inferred")):
        return "the tensors hold different row counts"
    if not (torch.isfinite(sampling).all() and (sampling >= 0).all() and sampling.sum() > 0):
        return "sampling_weights are not finite, non-negative weights"
    return ""


def check_groups_match(groups: GroupsResult, inputs) -> None:
    """The groups were inferred on this dataset with this base (`invdiff train` and `invdiff calibrate` read them
    row by row)."""
    for key, have in (("data_fingerprint", inputs.data_fingerprint), ("base_fingerprint", inputs.base_fingerprint)):
        made = groups.meta.get(key, "")
        if made != have:
            what = "--data" if key.startswith("data") else "--model"
            raise InvdiffError(f"--groups: made for {what} {str(made)[:12]}, got {have[:12]}; rerun `invdiff groups` "
                               f"with this {what}")
    if groups.grouping.weights.shape[0] != inputs.latents.shape[0]:
        raise InvdiffError("--groups: row count does not match the dataset; rerun `invdiff groups`")


def _check_recipe(recipe: str, groups: int | None) -> int:
    if recipe == "erm":
        raise InvdiffError("--recipe erm: needs no groups; run `invdiff train --recipe erm` directly")
    if recipe not in ("invdiff-rt", "paper"):
        raise InvdiffError(f"--recipe {recipe}: unknown; use invdiff-rt or paper")
    if recipe == "invdiff-rt" and groups not in (None, 2):
        raise InvdiffError(f"--groups {groups}: recipe invdiff-rt always uses 2 groups (majority, inferred "
                           "minority); drop --groups or use --recipe paper")
    if groups is not None and groups < 2:
        raise InvdiffError(f"--groups {groups}: need at least 2 groups")
    return groups or (4 if recipe == "paper" else 2)


def hidden_minority(data_dir: str | Path, column: str, prompt_ids: torch.Tensor) -> torch.Tensor:
    """Per-prompt minority flags from a hidden attribute column (diagnostics and oracle only); "a,b" gives [N,2]."""
    from ..data.folder import attribute_of, read_split

    records = read_split(data_dir, "train")
    flags = [prompt_minority(attribute_of(records, c.strip()), prompt_ids) for c in column.split(",")]
    return flags[0] if len(flags) == 1 else torch.stack(flags, dim=1)


def _profile_grouping(model, inputs, recipe: str, groups: int, seed: int, batch_size: int, profile_config,
                      show_progress: bool, outlier_k: float = 3.0) -> tuple[Grouping, dict]:
    from . import losses

    config = profile_config or losses.ProfileConfig()
    scheduler = losses.make_noise_scheduler(model)
    if config.score == "classifier" and len(inputs.prompts) < 2:
        raise InvdiffError("--score classifier: the training data has a single prompt, nothing to compare it "
                           "with; use --score contrast")
    total = losses.forward_count(recipe, inputs.latents.shape[0], config, len(inputs.prompts))
    with losses.progress_bar(total, f"loss profile ({recipe})", show_progress) as advance:
        if recipe == "paper":
            profile = losses.paper_profile(model.unet, scheduler, inputs, seed, batch_size, advance)
            grouping = group_paper(profile.score, groups, seed)
        else:
            profile = losses.band_profile(model.unet, scheduler, inputs, config, seed, batch_size, advance)
            grouping = group_robust(profile.score, inputs.prompt_ids, k=outlier_k)
            if config.second_split:
                grouping.candidate, grouping.info["candidate"] = _candidate_of(model, scheduler, inputs, grouping,
                                                                             profile, config, seed, batch_size,
                                                                             advance)
    return grouping, {"band": list(profile.band), "outlier_k": outlier_k, **profile.info}


def _candidate_of(model, scheduler, inputs, grouping: Grouping, profile, config, seed: int, batch_size: int,
                  advance):
    """The candidate second split (`splits.py`) and how it was made. Its top level is the band's contrast score:
    the profile's own score, unless the groups used the classifier score (then drawn again, as the contrast)."""
    from dataclasses import replace

    from . import losses, splits

    band = profile.score if config.score == "contrast" else losses.band_score(
        model.unet, scheduler, inputs, profile.band, replace(config, score="contrast"), seed, batch_size, advance)
    score = splits.candidate_score(model.unet, scheduler, inputs, band, seed, batch_size, advance)
    candidate = splits.candidate_split(score, grouping.inferred, inputs.prompt_ids)
    return candidate, {**splits.CANDIDATE_SETTINGS, "size": int(candidate.sum())}


def infer_groups(model, data_dir: str | Path, recipe: str = "invdiff-rt", seed: int = 0, groups: int | None = None,
                 batch_size: int = 256, profile_config=None, oracle_column: str | None = None,
                 report_attribute: str | None = None, show_progress: bool = True,
                 outlier_k: float = 3.0) -> GroupsResult:
    """The `groups` stage: frozen-base loss profile -> label-free groups (or oracle groups from a hidden column)."""
    import time

    from .cache import base_inputs

    n_groups = _check_recipe(recipe, groups if oracle_column is None else None)
    if report_attribute and "," in report_attribute:
        raise InvdiffError(f"--report-attribute {report_attribute}: give one column (run once per attribute)")
    start = time.perf_counter()
    inputs = base_inputs(model, data_dir)
    reported = flagged_column(data_dir, report_attribute, inputs.prompt_ids, "--report-attribute")  # before the profile
    if oracle_column:
        grouping = group_from_flags(flagged_column(data_dir, oracle_column, inputs.prompt_ids, "--oracle-groups-from"),
                                    inputs.prompt_ids, recipe)
        profile_info, n_groups = {"source": f"oracle:{oracle_column}"}, grouping.weights.shape[1]
    else:
        grouping, profile_info = _profile_grouping(model, inputs, recipe, n_groups, seed, batch_size,
                                                   profile_config, show_progress, outlier_k)
        profile_info["source"] = "inferred"
    meta = {"recipe": recipe, "groups": n_groups, "seed": seed, "n": int(inputs.latents.shape[0]),
            "data_fingerprint": inputs.data_fingerprint, "base_fingerprint": inputs.base_fingerprint,
            "prompts": inputs.prompts, "group_sizes": grouping.weights.sum(0).tolist(),
            "inferred_size": int(grouping.inferred.sum()), "grouping": grouping.info, "profile": profile_info,
            "seconds": round(time.perf_counter() - start, 2)}
    if reported is not None:
        meta["diagnostics"] = {"attribute": report_attribute, **group_diagnostics(
            grouping.score, grouping.inferred, grouping.weights, grouping.sampling, reported)}
        if grouping.candidate is not None:
            meta["diagnostics"]["candidate_minority"] = int((grouping.candidate & reported).sum())
    return GroupsResult(grouping, meta)


def flagged_column(data_dir, column: str | None, prompt_ids: torch.Tensor, flag: str) -> torch.Tensor | None:
    """`hidden_minority` of a column a flag names (None without one); a missing column names the flag."""
    if not column:
        return None
    try:
        return hidden_minority(data_dir, column, prompt_ids)
    except InvdiffError as err:
        raise InvdiffError(f"{flag} {column}: {err}") from err
