"""What the guided base draws, label-free: a reader of the groups' split, read on the base's own samples.

The `rb` target shifts each prompt's posterior from a prior to the groups' sampler (`targets.Posterior`). By default
the prior is the data. The guided base, though, draws each prompt's majority more often than the data holds it
(colored-digits at CFG 3.0: 0.98 where the data has 0.95), so a shift from the data's shares leaves the sampler short
of the balance and the weight makes up the rest (README: *Why the default needs w ≈ 1.3*).
`invdiff train --shares-from samples` estimates the drawn shares without labels:

1. The reader, a small CNN (`eval.classifiers.SmallCNN`) with one class per (prompt, flag) cell and every cell the
   same total loss weight, learns the groups' inferred flags from the training images in two folds, so each training
   row is read by the fold model that did not see it: its flags there are the data's shares as the reader sees them.
2. Both fold models read the base's own samples (`PER_PROMPT` a prompt unless `--shares-per-prompt` says otherwise, at
   the CFG scale, seed `SEED`): the drawn shares.
3. The prior is `grouper.sampler_prior` on the reader's training flags with those drawn shares, as for
   `--oracle-shares-from`, whose reports read the same from the hidden column.

Measured with `bench/drawn_shares_reader.py` (128 base samples a prompt, CFG 3.0): on colored-digits the reader's
drawn minority share is 0.019 against the evaluation classifier's 0.020 (per prompt: correlation 0.91), and on the
training rows 0.052 against the data's 0.051; the groups' diffusion detector read 0.004 (`drawn_shares_probe.py`).
It needs a split that holds one attribute with fair recall: from shapes-habitats' 30 inferred rows it reads 0.027
against 0.102, from styled-digits' mixed second split the stroke at correlation 0.36 (README: opt-in, not the
default).

The refinement of a second split (`splits.rerank`) reads with `SharedReader`: one score for every prompt, with a
scale and a bias of each prompt, for an attribute whose minority side differs between the prompts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InvdiffError
from .grouper import clamped_share, sampler_prior

PER_PROMPT = 128  # base samples a prompt the drawn shares are read on (`invdiff train --shares-per-prompt`)
SEED = 2000  # their sampling seed: not the evaluation's (0) nor the calibration's (1000)
EPOCHS = 8  # the reader's epochs per fold
MAX_SIZE = 64  # the reader's input: the training images at their own size, at most this


def reader_images(data_dir: str | Path) -> torch.Tensor:
    """The training images as float [N,3,H,W] in [-1,1], at their own size, or at `MAX_SIZE` when larger, not
    square or smaller than the readers take (`classifiers.MIN_SIZE`)."""
    from ..data.folder import load_images, native_size, read_split
    from ..eval.classifiers import MIN_SIZE

    records = read_split(data_dir, "train")
    width, height = native_size(records) or (0, 0)
    return load_images(records, None if MIN_SIZE <= width == height <= MAX_SIZE else MAX_SIZE)


def cells_of(prompt_ids: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """long [N]: each row's (prompt, flag) cell, prompt * 2 + flag (the readers' targets)."""
    return prompt_ids * 2 + flags.long()


def _alike(cells: torch.Tensor) -> torch.Tensor:
    """Per-row loss weights that give every cell the same total."""
    import numpy as np

    from ..eval.classifiers import cell_weights

    return cell_weights(cells.numpy(), np.zeros(len(cells), np.int64))


def fit_reader(x: torch.Tensor, prompt_ids: torch.Tensor, flags: torch.Tensor, prompts: int, seed: int):
    """A SmallCNN with 2 classes per prompt (its majority, its flagged rows), every (prompt, flag) cell weighted
    alike."""
    from ..eval.classifiers import fit, seeded_cnn

    cells = cells_of(prompt_ids, flags)
    net = seeded_cnn(x.shape[1], 2 * prompts, seed)
    fit(net, x, cells, _alike(cells), EPOCHS, seed)
    return net.eval()


SHARED_SCALE = 0.01  # the shared reader's per-prompt scales start near 0, so that each prompt's sign is learnt ...
SHARED_SCALE_LR = 20.0  # ... at this multiple of the score's learning rate (from 1.0 at 1x, none flipped)


class SharedReader(torch.nn.Module):
    """One score s(x) for every prompt, read per prompt as scale_p * s(x) + bias_p: logits [N, prompts]. It reads an
    attribute the prompts share whose minority side differs between them (styled-digits' stroke: thin for 0-4,
    thick for 5-9), where a head per prompt learns each prompt's atypical rows, and one head the majority's side."""

    def __init__(self, channels: int, prompts: int, seed: int):
        from ..eval.classifiers import seeded_cnn

        super().__init__()
        self.score = seeded_cnn(channels, 1, seed)
        self.scale = torch.nn.Parameter(torch.full((prompts,), SHARED_SCALE))
        self.bias = torch.nn.Parameter(torch.zeros(prompts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x) * self.scale + self.bias


def cell_bce(logits: torch.Tensor, cells: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """Binary cross-entropy of each row's own prompt's logit (`cells`: `cells_of`)."""
    own = logits[torch.arange(len(cells)), cells // 2]
    return torch.nn.functional.binary_cross_entropy_with_logits(own, (cells % 2).float(), reduction=reduction)


def fit_shared_reader(x: torch.Tensor, prompt_ids: torch.Tensor, flags: torch.Tensor, prompts: int, seed: int):
    """A `SharedReader` of the flags, every (prompt, flag) cell weighted alike."""
    from ..eval.classifiers import LR, fit

    cells = cells_of(prompt_ids, flags)
    net = SharedReader(x.shape[1], prompts, seed)
    groups = [{"params": net.score.parameters()}, {"params": [net.scale, net.bias], "lr": SHARED_SCALE_LR * LR}]
    fit(net, x, cells, _alike(cells), EPOCHS, seed, loss_fn=cell_bce, params=groups)
    return net.eval()


def read(net, x: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
    """P(flagged | image, its prompt): the sigmoid of a `SharedReader`'s logit of the image's own prompt, or the
    softmax of a `fit_reader` reader's two logits of it."""
    with torch.no_grad():
        logits = torch.cat([net(x[i:i + 512]) for i in range(0, len(x), 512)])
    own = torch.arange(len(x)), prompt_ids
    if isinstance(net, SharedReader):
        return logits[own].sigmoid()
    return logits.view(len(x), -1, 2)[own].softmax(1)[:, 1]


def grey(x: torch.Tensor) -> torch.Tensor:
    """Images with every channel their max over channels: a reader of the shape that a colour does not hide."""
    from ..eval.classifiers import strip_colour

    return strip_colour(x, "max").expand_as(x).contiguous()


def folds(prompt_ids: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """bool [N]: the first fold, every other row of each (prompt, flag) cell in row order (each fold holds half of
    every cell, however the rows are ordered)."""
    cells = cells_of(prompt_ids, flags)
    order = torch.argsort(cells, stable=True)
    first_of_cell = torch.searchsorted(cells[order], cells[order])
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order)) - first_of_cell
    return rank % 2 == 0


def cross_fit_probability(x: torch.Tensor, prompt_ids: torch.Tensor, flags: torch.Tensor, prompts: int,
                          seed: int, fitter=None) -> tuple[list, torch.Tensor]:
    """Two fold readers (`folds`, each made by `fitter`, default `fit_reader`) and each training row's P(flagged)
    from the reader that did not see it."""
    fold, fitter = folds(prompt_ids, flags), fitter or fit_reader
    nets = [fitter(x[rows], prompt_ids[rows], flags[rows], prompts, seed + i)
            for i, rows in enumerate((fold, ~fold))]
    held = torch.empty(len(x))
    held[fold], held[~fold] = read(nets[1], x[fold], prompt_ids[fold]), read(nets[0], x[~fold], prompt_ids[~fold])
    return nets, held


def cross_fit(x: torch.Tensor, prompt_ids: torch.Tensor, flags: torch.Tensor, prompts: int,
              seed: int) -> tuple[list, torch.Tensor]:
    """Two fold readers (`folds`) and each training row's flag from the reader that did not see it."""
    nets, held = cross_fit_probability(x, prompt_ids, flags, prompts, seed)
    return nets, held > 0.5


def drawn_majority(nets: list, images, prompts: int, per_prompt: int, size: int) -> list[float]:
    """Per prompt, the share of `images` (uint8 [P*N,H,W,3], grouped by prompt) the readers leave unflagged (their
    mean P(flagged) at most 0.5), clamped to 0.5/n..1 - 0.5/n."""
    from ..eval.classifiers import to_model_input

    x = to_model_input(images, size)
    ids = torch.arange(prompts).repeat_interleave(per_prompt)
    flagged = torch.stack([read(net, x, ids) for net in nets]).mean(0) > 0.5
    return [clamped_share(1 - flagged[ids == p].sum().item() / per_prompt, per_prompt) for p in range(prompts)]


def drawn_prior(model, data_dir, inputs, inferred: torch.Tensor, guidance_scale: float, seed: int,
                per_prompt: int) -> tuple[torch.Tensor, dict]:
    """`--shares-from samples`: the prior of `targets.Posterior` and adapter.json's `sampler_prior` record, read on
    `per_prompt` base samples a prompt."""
    from ..eval.evaluate import generate_images

    if not inferred.any():
        raise InvdiffError("--shares-from samples: the groups flag no row, so there is nothing to read; use "
                           "--shares-from data")
    x = reader_images(data_dir)
    nets, flags = cross_fit(x, inputs.prompt_ids, inferred, len(inputs.prompts), seed)
    images = generate_images(model, inputs.prompts, per_prompt, SEED, guidance_scale=guidance_scale)
    drawn = drawn_majority(nets, images, len(inputs.prompts), per_prompt, x.shape[-1])
    data = [1 - flags[inputs.prompt_ids == p].sum().item() / (inputs.prompt_ids == p).sum().item()
            for p in range(len(inputs.prompts))]
    meta = {"source": "samples", "guidance_scale": guidance_scale, "per_prompt": per_prompt, "seed": SEED,
            "majority_share": dict(zip(inputs.prompts, drawn)), "data_majority_share": dict(zip(inputs.prompts, data))}
    return sampler_prior(flags, inputs.prompt_ids, drawn), {"sampler_prior": meta}
