"""A second split: the minority of a second spurious attribute, found without labels, kept only when it is one.

One robust-z split of the groups' score finds the attribute the frozen model ranks first (colour on styled-digits)
and hardly the next one (stroke: AUROC 0.74). Label-free steps add the second attribute's minority:

1. `invdiff groups` (the *candidate*): per prompt, among the rows outside the first split, robust z > `CANDIDATE_K`
   of the log contrast summed over t >= 700: one antithetic pair at each of `CANDIDATE_LEVELS` plus the first
   split's own band score (its pair in the band, t ~ 975 on every dataset here; already drawn: reusing it in place
   of a pair of its own at t = 975 kept the stroke rows it finds on styled-digits (158 against 162) and the test's
   verdicts, and saves a fifth of the candidate's time; groups made with `--score classifier` draw the band's
   contrast again). Summed over t >= 700 the contrast ranks both of styled-digits' stroke minorities (thick and
   thin), where the first split's band sees only the thin ones (bench/results/debiasing.md, *Two spurious
   attributes*, *A cheaper candidate*).
2. `invdiff train` (the *test*): a candidate is not always a second attribute. Where there is none it holds more of
   the first attribute's minority (shapes-habitats) or rows atypical in the first attribute (colored-digits), and
   balancing it as a second attribute counts the first one twice (the bias reverses). So the adapter trained on the
   first split is asked how much of the candidate's excess score it removes, relative to the first split's
   (`attribute_test`): rows atypical in the first attribute lose part of their excess with it (ratio 0.42 on
   colored-digits), rows of another attribute do not, or gain (-0.25 on styled-digits, whose stroke minorities the
   colour shift makes more atypical). Below `TEST_THRESHOLD` the candidate becomes the second split and the adapter
   is fine-tuned with both splits balanced by the raked sampler (`grouper.raked_sampling_weights`); above it the
   adapter is the one-split adapter, bit for bit.
3. `invdiff train` (the *refinement*, once the test keeps the candidate): the candidate also holds first-attribute
   minorities the first split missed and rows atypical in other ways (stroke precision 0.38 on styled-digits). A
   reader of the first split's rows (`drawn.cross_fit`, on the training images) drops the candidate rows it flags;
   a reader of what is left then ranks every row outside both, held out, and each prompt keeps as many of the
   top-ranked as the cleaned candidate had (`refine`). That reader is one score shared by the prompts, with a
   scale and a bias of each prompt (`drawn.SharedReader`, on grey images): the second attribute is the one thing
   the prompts' candidate rows have in common, whichever side of it is a prompt's minority. On styled-digits it
   raises the split's stroke precision from 0.40 (cleaned) to 0.75 (a head per prompt, which learns each digit's
   atypical rows: 0.47; digit 9: 17 of 23 rows against 9) (bench/results/debiasing.md, *A shared reader for the
   refinement*).
4. `invdiff train` (the *joint rows*): the two splits are disjoint, so the target's first-split mass holds almost
   only the second attribute's majority, and the adapter then draws the second minority only inside the first
   attribute's majority (styled-digits: 0.24 of its colour-minority samples are stroke minorities, its target's
   0.54; red fives 1 of 61 thick, so digit 5's stroke stays at 0.83-0.87). Readers of the refined split, trained on
   the rows outside the first split on grey images (the first attribute may be their colour), read the first
   split's rows; per prompt the rows they flag (`joint_rows`) get `JOINT_FRACTION` of the first split's mass in the
   fine-tune's sampler, and the second split gives as much to the rows in neither split (`fill_joint`: a quarter of
   each prompt's mass in each of the four cells of the two attributes). On styled-digits they find 29-31 of the
   first split's 135 rows, 22 of them stroke minorities (bench/results/debiasing.md, *Where the stroke minority is
   drawn*, *Both minorities*, *A shared reader for the refinement*).
"""

from __future__ import annotations

import itertools
import math
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .adapter import LISTED_ROWS
from .grouper import prompt_median_mad, robust_z
from .losses import Advance, ScoreInputs, _gen, mean_score

CANDIDATE_LEVELS = (700, 800, 850, 925)  # t of the candidate's summed log contrast, besides the first split's band
CANDIDATE_K = 1.5  # robust z cut of the candidate among the rows outside the first split
CANDIDATE_SETTINGS = {"levels": list(CANDIDATE_LEVELS), "band": True, "k": CANDIDATE_K}  # recorded with the groups,
# in the demo key
SCORE_BATCH = 256  # UNet batch of the test's scoring (as `invdiff groups --batch-size`)
TEST_LEVEL = 975  # t of the test's score
TEST_WEIGHT = 1.35  # the adapter weight the test scores at (before calibration; the calibrated weights of the
# default recipe are 1.27-1.37 on colored-digits, shapes-habitats and styled-digits)
TEST_THRESHOLD = 0.1  # the candidate is a second attribute when the adapter removes less than this share of its
# excess, relative to the first split's
REFINE_ROUNDS = 1  # reader rounds of `refine`
REFINE_SEED = 0  # the readers' seed: the refined split belongs to the groups, not to the adapter's training seed
JOINT_FRACTION = 0.5  # of each prompt's first-split mass in the fine-tune, given to its `joint_rows`: the four cells
# of the two attributes alike (`fill_joint`; 0.3 and 0.7 were worse with the per-prompt reader and the old sampler)
JOINT_SEED = 100  # the joint-row readers' seeds: JOINT_SEED, JOINT_SEED + 1


def level_draws(shape: torch.Size, t: int, seed: int, level: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One antithetic pair at fixed t: [(t, +noise), (t, -noise)], seeded by (seed, level)."""
    noise = torch.randn(shape, generator=_gen(seed, 9, level))
    ts = torch.full((shape[0],), t, dtype=torch.long)
    return [(ts, noise), (ts, -noise)]


def log_score_at(unet, scheduler, inputs: ScoreInputs, t: int, seed: int, level: int, score: str,
                 batch_size: int, advance: Advance | None = None) -> torch.Tensor:
    """float64 [N]: the log of `losses.mean_score` at fixed t over one antithetic pair."""
    draws = level_draws(inputs.latents.shape, t, seed, level)
    return mean_score(unet, scheduler, inputs, draws, score, batch_size, advance).clamp_min(1e-12).log()


def candidate_score(unet, scheduler, inputs: ScoreInputs, band_score: torch.Tensor, seed: int, batch_size: int,
                    advance: Advance | None = None) -> torch.Tensor:
    """float64 [N]: the log contrast summed over `CANDIDATE_LEVELS` and the first split's band score."""
    return band_score.double().clamp_min(1e-12).log() + sum(
        log_score_at(unet, scheduler, inputs, t, seed, level, "contrast", batch_size, advance)
        for level, t in enumerate(CANDIDATE_LEVELS))


def candidate_split(score: torch.Tensor, first: torch.Tensor, prompt_ids: torch.Tensor,
                    k: float = CANDIDATE_K) -> torch.Tensor:
    """bool [N]: per prompt, among the rows outside `first`, robust z of `score` above k."""
    rest, flags = ~first, torch.zeros_like(first)
    x, pids = score[rest].double(), prompt_ids[rest]
    flags[rest] = robust_z(x, *prompt_median_mad(x, pids, int(prompt_ids.max()) + 1), pids) > k
    return flags


def excess(log_score: torch.Tensor, rows: torch.Tensor, rest: torch.Tensor, prompt_ids: torch.Tensor) -> float:
    """The median over `rows` of the log score above its prompt's median over the `rest` rows (rows of a prompt
    without `rest` rows are left out; nan when none is left)."""
    centred = torch.full_like(log_score, float("nan"))
    for p in prompt_ids.unique():
        in_p = prompt_ids == p
        if (in_p & rest).any():
            centred[in_p] = log_score[in_p] - log_score[in_p & rest].median()
    return float(centred[rows].nanmedian()) if rows.any() else float("nan")


class ShiftedUNet(torch.nn.Module):
    """The frozen UNet plus `weight` times an adapter's shift, called as the loss code calls a UNet (`.sample`)."""

    def __init__(self, unet, adapter, weight: float):
        super().__init__()
        self.unet, self.adapter, self.weight = unet, adapter, weight

    def forward(self, sample, timestep, encoder_hidden_states):
        eps = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample
        shift = self.adapter(sample, timestep.float(), encoder_hidden_states, eps)
        return types.SimpleNamespace(sample=eps + self.weight * shift)


@dataclass(frozen=True)
class AttributeTest:
    first_excess: tuple[float, float]  # the first split's excess log contrast, base and adapted
    second_excess: tuple[float, float]  # the candidate's
    rows: int  # rows scored
    weight: float = TEST_WEIGHT  # the adapter weight it scored at

    @property
    def removed(self) -> tuple[float, float]:
        """The share of each split's excess the adapter removed (nan where the base shows no excess)."""
        return tuple(1 - adapted / base if base > 0 else float("nan") for base, adapted in
                     (self.first_excess, self.second_excess))

    @property
    def ratio(self) -> float:
        """The candidate's removed share over the first split's; nan when either is undefined or the adapter
        removed none of the first split's excess (then it says nothing about the candidate)."""
        first, second = self.removed
        return second / first if first > 0 and math.isfinite(second) else float("nan")

    @property
    def second_attribute(self) -> bool:
        return math.isfinite(self.ratio) and self.ratio < TEST_THRESHOLD

    def record(self) -> dict:
        return {"level": TEST_LEVEL, "threshold": TEST_THRESHOLD, "weight": self.weight, "rows": self.rows,
                "excess_first": [_finite(x, 5) for x in self.first_excess],
                "excess_second": [_finite(x, 5) for x in self.second_excess],
                "removed": [_finite(x, 4) for x in self.removed], "ratio": _finite(self.ratio, 4),
                "second_attribute": self.second_attribute}


def _finite(x: float, digits: int) -> float | None:
    """JSON-safe: None for nan / inf."""
    return round(x, digits) if math.isfinite(x) else None


def attribute_test(unet, adapter, scheduler, inputs: ScoreInputs, first: torch.Tensor, second: torch.Tensor,
                   weight: float, seed: int, batch_size: int) -> AttributeTest:
    """How much of each split's excess log contrast (at `TEST_LEVEL`, the same x_t for both models) the adapter at
    `weight` removes; every training row is scored."""
    rest = ~(first | second)
    with torch.no_grad():
        scores = [log_score_at(u, scheduler, inputs, TEST_LEVEL, seed, 0, "contrast", batch_size)
                  for u in (unet, ShiftedUNet(unet, adapter, weight))]
    return AttributeTest(tuple(excess(x, first, rest, inputs.prompt_ids) for x in scores),
                         tuple(excess(x, second, rest, inputs.prompt_ids) for x in scores), len(first), weight)


FINETUNE_FRACTION = 0.3  # fine-tune steps with both splits, as a fraction of the adapter's training steps
FINETUNE_TEMPERATURE = 2.0  # ... whose target shift comes from posteriors at logits / 2 (targets.Posterior)
TEST_SETTINGS = {"level": TEST_LEVEL, "threshold": TEST_THRESHOLD, "weight": TEST_WEIGHT,
                 "finetune_fraction": FINETUNE_FRACTION}


def has_candidate(grouping) -> bool:
    return grouping.candidate is not None and bool(grouping.candidate.any())


def finetune_steps(steps: int) -> int:
    return max(1, int(steps * FINETUNE_FRACTION))


def with_second_split(grouping, prompt_ids: torch.Tensor, second: torch.Tensor | None = None,
                      joint: torch.Tensor | None = None, joint_fraction: float = JOINT_FRACTION):
    """The grouping with a second split, `second` (default: its candidate): one group per combination of the two
    flags, the raked sampler (each split's rows half of every prompt's mass: the splits are disjoint, so the rows in
    neither keep almost none of it, ~0.3 %), with the first split's `joint` rows weighed up as the second
    attribute's minority (`fill_joint`; None: none); the first split's score is kept (the weight rule's detector)."""
    from .grouper import Grouping, group_from_flags

    second = grouping.candidate if second is None else second
    two = group_from_flags(torch.stack([grouping.inferred, second], 1), prompt_ids, "invdiff-rt")
    sampling = (two.sampling if joint is None else
                fill_joint(two.sampling, prompt_ids, grouping.inferred, second, joint, joint_fraction))
    return Grouping(two.weights, grouping.score, sampling, two.inferred, {**grouping.info, "second_split": True})


def fill_joint(sampling: torch.Tensor, prompt_ids: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
               joint: torch.Tensor, fraction: float = JOINT_FRACTION) -> torch.Tensor:
    """The sampler with, in every prompt that has both, `fraction` of the first split's mass on its `joint` rows
    and the rest on its other rows; the joint rows hold the second attribute's minority too, so as much of the
    second split's mass goes to the rows in neither split (at 0.5, with the raked halves: a quarter of the prompt's
    mass in each of the four cells of the two attributes). Each set is scaled as it was; every prompt's mass, and
    the first split's, is kept."""
    s = sampling.clone().double()
    for p in range(int(prompt_ids.max()) + 1):
        in_p = prompt_ids == p
        on, off = first & joint & in_p, first & ~joint & in_p
        if on.any() and off.any():
            mass = s[on].sum() + s[off].sum()
            s[on] *= fraction * mass / s[on].sum()
            s[off] *= (1 - fraction) * mass / s[off].sum()
            _move(s, second & in_p, ~first & ~second & in_p, fraction * mass)
    return s.to(sampling.dtype)


def _move(s: torch.Tensor, source: torch.Tensor, to: torch.Tensor, mass: torch.Tensor) -> None:
    """Move up to `mass` of the sampler's mass from the `source` rows to the `to` rows, each scaled as it was
    (nothing where either has none)."""
    have, into = s[source].sum(), s[to].sum()
    if have > 0 and into > 0:
        moved = torch.minimum(mass, have)
        s[source] *= (have - moved) / have
        s[to] *= (into + moved) / into


def joint_rows(x: torch.Tensor, prompt_ids: torch.Tensor, first: torch.Tensor, second: torch.Tensor, prompts: int,
               seed: int = JOINT_SEED) -> torch.Tensor:
    """bool [N]: the first split's rows that two readers of `second` (trained on the rows outside the first split,
    on grey images: max over channels) flag, by their mean P(flagged) over 0.5. `x`: `drawn.reader_images`."""
    from .drawn import fit_reader, grey, read

    if not (first.any() and second.any()):
        return torch.zeros_like(first)  # nothing to read, or nothing to read it as
    x, rest = grey(x), ~first
    nets = [fit_reader(x[rest], prompt_ids[rest], second[rest], prompts, seed + i) for i in range(2)]
    p = torch.stack([read(net, x[first], prompt_ids[first]) for net in nets]).mean(0)
    flags = torch.zeros_like(first)
    flags[first] = p > 0.5
    return flags


def top_per_prompt(p: torch.Tensor, prompt_ids: torch.Tensor, allowed: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """bool [N]: per prompt, its `counts[prompt]` allowed rows of highest p."""
    flags = torch.zeros(len(p), dtype=torch.bool)
    for prompt, k in enumerate(counts):
        rows = torch.nonzero((prompt_ids == prompt) & allowed).squeeze(1)
        flags[rows[p[rows].argsort(descending=True)[:k]]] = True
    return flags


def clean(x: torch.Tensor, prompt_ids: torch.Tensor, first: torch.Tensor, candidate: torch.Tensor, prompts: int,
          seed: int = REFINE_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(the candidate less the rows a held-out reader of the first split flags, the rows a refined split may take:
    outside the first split and unflagged)."""
    from .drawn import cross_fit

    allowed = ~first & ~cross_fit(x, prompt_ids, first, prompts, seed)[1]
    return candidate & allowed, allowed


def rerank(x: torch.Tensor, prompt_ids: torch.Tensor, flags: torch.Tensor, allowed: torch.Tensor, counts: list[int],
           prompts: int, seed: int) -> torch.Tensor:
    """One reader round: per prompt, the `counts` allowed rows that a held-out `drawn.SharedReader` of `flags`, on
    grey images, ranks highest."""
    from .drawn import cross_fit_probability, fit_shared_reader, grey

    held = cross_fit_probability(grey(x), prompt_ids, flags, prompts, seed, fit_shared_reader)[1]
    return top_per_prompt(held, prompt_ids, allowed, counts)


def refinement(x: torch.Tensor, prompt_ids: torch.Tensor, first: torch.Tensor, candidate: torch.Tensor, prompts: int,
               seed: int = REFINE_SEED) -> Iterator[torch.Tensor]:
    """The cleaned candidate (`clean`), then each reader round's split (`rerank`, round r at seed + 10 + 2r), one
    after the other; nothing after an empty cleaned candidate. `x`: the training images (`drawn.reader_images`)."""
    flags, allowed = clean(x, prompt_ids, first, candidate, prompts, seed)
    counts = [int((flags & (prompt_ids == p)).sum()) for p in range(prompts)]
    yield flags
    for r in itertools.count() if flags.any() else ():
        flags = rerank(x, prompt_ids, flags, allowed, counts, prompts, seed + 10 + 2 * r)
        yield flags


def refine(x: torch.Tensor, prompt_ids: torch.Tensor, first: torch.Tensor, candidate: torch.Tensor,
           prompts: int) -> torch.Tensor:
    """bool [N]: the candidate as the fine-tune's second split (step 3 of the module's docstring): `refinement`
    after `REFINE_ROUNDS` rounds."""
    *_, flags = itertools.islice(refinement(x, prompt_ids, first, candidate, prompts), REFINE_ROUNDS + 1)
    return flags


def describe(test: dict | None) -> str:
    """One line on what the test decided (adapter.json's `second_split`), for the CLI and the demo report."""
    if not test:
        return "no candidate second split was tested"
    ratio = "an undefined share (no excess to remove)" if test["ratio"] is None else f"{test['ratio']:.2f}"
    refined = f", refined to {test['refined_size']} rows" if "refined_size" in test else ""
    refined += (f" ({len(test['joint_rows'])} first-split rows that read like it get {test['joint_fraction']:g} of "
                "the first split's mass)" if test.get("joint_rows") else "")
    tempered = f" (posterior temperature {test['finetune_temperature']:g})" if "finetune_temperature" in test else ""
    verdict = (f"a second attribute{refined}: fine-tuned {test['finetune_steps']} steps with both splits balanced"
               f"{tempered}"
               if test["second_attribute"] else "nothing to compare with: not added" if test["ratio"] is None
               else "more of the first attribute: not added")
    return (f"candidate second split ({test['candidate_size']} rows): the trained adapter at w {test['weight']:g} "
            f"removed {ratio} of its excess score relative to the first split's (threshold {test['threshold']:g}) "
            f"-> {verdict}")


def recorded_rows(test: dict, n: int, key: str = "refined_rows") -> torch.Tensor | None:
    """The rows adapter.json's `second_split` record lists under `key` as bool [n]: the refined second split
    (`refined_rows`; None for adapters trained before the refinement: their second split is the candidate) or the
    first split's joint rows (`joint_rows`; None for adapters trained before them)."""
    if key not in test:
        return None
    flags = torch.zeros(n, dtype=torch.bool)
    flags[torch.as_tensor(test[key], dtype=torch.long)] = True
    return flags


def trained_splits(test: dict, n: int) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    """`with_second_split`'s (second, joint, joint_fraction) as adapter.json's `second_split` record lists them
    (None where an adapter from before the refinement or the joint rows has none)."""
    second, joint = (recorded_rows(test, n, key) for key in LISTED_ROWS)
    return second, joint, test.get("joint_fraction", JOINT_FRACTION)


def as_trained(groups, manifest: dict, prompt_ids: torch.Tensor):
    """The groups an adapter was trained on: with its second split (the refined candidate, or the candidate for
    adapters trained before the refinement) when the test added it (adapter.json `second_split`), so that
    calibrating it again weighs the same sampler."""
    from .grouper import GroupsResult

    test = manifest.get("second_split") or {}
    if not test.get("second_attribute") or groups is None or groups.grouping.candidate is None:
        return groups
    return GroupsResult(with_second_split(groups.grouping, prompt_ids, *trained_splits(test, len(prompt_ids))),
                        groups.meta)
