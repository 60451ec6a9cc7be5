"""drawn.py: the reader of the groups' split learns the attribute behind it (it flags minority rows the groups missed)
and reads the drawn shares off generated images; the prior it gives is `sampler_prior` on its flags."""

from __future__ import annotations

import numpy as np
import torch

from invdiff_rt.eval import classifiers
from invdiff_rt.method import drawn, grouper


def _squares(colours: list[str], seed: int) -> np.ndarray:
    """uint8 [N,16,16,3]: a red or green square at a random place on black."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(colours), 16, 16, 3), np.uint8)
    for i, c in enumerate(colours):
        y, x = rng.integers(0, 8, 2)
        out[i, y:y + 8, x:x + 8, 0 if c == "red" else 1] = rng.integers(150, 256)
    return out


def _as_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def test_reader_learns_the_attribute_and_reads_drawn_shares(monkeypatch):
    monkeypatch.setattr(drawn, "EPOCHS", 12)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_reader()
    finally:
        torch.set_num_threads(threads)


def _check_reader():
    # two prompts of 160 rows: prompt 0 red with 16 green (minority), prompt 1 green with 16 red
    colours = [("green" if i < 16 else "red") if p == 0 else ("red" if i < 16 else "green")
               for p in range(2) for i in range(160)]
    ids = torch.arange(2).repeat_interleave(160)
    truth = torch.tensor([(i % 160) < 16 for i in range(320)])
    inferred = truth.clone()
    inferred[[0, 1, 160]] = False  # the groups missed three minority rows
    x = _as_input(_squares(colours, seed=0))
    nets, held = drawn.cross_fit(x, ids, inferred, 2, seed=0)
    assert torch.equal(held, truth)  # the missed rows are read as minority too
    # generated: prompt 0 draws 3 of 10 in green, prompt 1 none of 10 (clamped to 1 - 0.5 / 10)
    samples = _squares(["green"] * 3 + ["red"] * 7 + ["green"] * 10, seed=1)
    assert drawn.drawn_majority(nets, samples, 2, 10, 16) == [0.7, 0.95]
    # at 32 px, resized to the reader's 16
    big = np.repeat(np.repeat(samples, 2, axis=1), 2, axis=2)
    assert drawn.drawn_majority(nets, big, 2, 10, 16) == [0.7, 0.95]
    prior = grouper.sampler_prior(held, ids, [0.7, 0.95])
    assert torch.allclose(prior[:16], torch.full((16,), 0.3 / 0.1)) and torch.allclose(prior[16:160],
                                                                                       torch.full((144,), 0.7 / 0.9))


def test_folds_halve_every_cell_whatever_the_row_order():
    """Every other row of each (prompt, flag) cell, in row order: here the flagged rows all sit at even indices, which
    a split by row parity would put in one fold."""
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 0, 0])
    flags = torch.tensor([1, 0, 1, 0, 0, 0, 1, 1, 0, 0]).bool()
    assert drawn.folds(ids, flags).int().tolist() == [1, 1, 0, 0, 1, 0, 1, 0, 1, 0]


def test_reader_images_follow_the_metadata_and_no_flag_is_refused(tmp_path):
    """reader_images: the training rows in metadata order (as `base_inputs` reads them), at their own size up to
    MAX_SIZE; drawn_prior refuses groups that flag no row before it samples anything."""
    import json

    import pytest
    from PIL import Image

    from invdiff_rt.errors import InvdiffError

    train = tmp_path / "train"
    train.mkdir()
    levels = [30, 200, 120]
    for i, level in enumerate(levels):
        Image.fromarray(np.full((96, 96, 3), level, np.uint8)).save(train / f"{i}.png")
    order = [2, 0, 1]
    (train / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": "a"}) + "\n"
                                                  for i in order))
    x = drawn.reader_images(tmp_path)
    assert x.shape == (3, 3, drawn.MAX_SIZE, drawn.MAX_SIZE)
    assert [round((v.item() + 1) * 127.5) for v in x.mean((1, 2, 3))] == [levels[i] for i in order]
    with pytest.raises(InvdiffError, match="--shares-from samples: the groups flag no row"):
        drawn.drawn_prior(None, tmp_path, None, torch.zeros(3, dtype=torch.bool), 3.0, 0, 8)


def test_cross_fit_reads_each_row_with_the_fold_model_that_did_not_see_it(monkeypatch):
    """Each fold model is trained on one fold (`folds`) and reads only the other's rows; every row is read once."""
    trained, read_by = [], {}

    def fit(x, prompt_ids, flags, prompts, seed):
        trained.append(set(x.flatten().tolist()))
        return len(trained) - 1

    def read(net, x, prompt_ids):
        read_by[net] = set(x.flatten().tolist())
        return torch.zeros(len(x))

    monkeypatch.setattr(drawn, "fit_reader", fit)
    monkeypatch.setattr(drawn, "read", read)
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 0, 0])
    flags = torch.tensor([1, 0, 1, 0, 0, 0, 1, 1, 0, 0]).bool()
    drawn.cross_fit(torch.arange(10.0).view(10, 1, 1, 1), ids, flags, 2, seed=0)
    first = {float(i) for i in torch.nonzero(drawn.folds(ids, flags)).flatten().tolist()}
    assert trained == [first, set(map(float, range(10))) - first]
    assert read_by == {1: first, 0: trained[1]}


def test_fit_reader_is_seeded_without_touching_the_global_rng(monkeypatch):
    """The reader's initial weights come from its seed alone, and the caller's global RNG stream goes on as if the
    reader had not been fitted (train's refinement runs between the adapter's own seeded steps)."""
    monkeypatch.setattr(drawn, "EPOCHS", 0)  # initial weights only
    x = _as_input(_squares(["red", "green"] * 4, seed=0))
    ids, flags = torch.zeros(8, dtype=torch.long), torch.tensor([False, True] * 4)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = drawn.fit_reader(x, ids, flags, 1, seed=7)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(999)
    second = drawn.fit_reader(x, ids, flags, 1, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    torch.manual_seed(7)
    plain = classifiers.SmallCNN(3, 2)  # the weights seeding the global RNG gave before
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), plain.state_dict().values()))


def test_reader_images_smaller_than_the_readers_take_are_upsampled(tmp_path):
    """1-3 px images reached a max_pool2d RuntimeError in the readers (`--shares-from samples`, the refinement)."""
    import json

    from PIL import Image

    from invdiff_rt.eval.classifiers import MIN_SIZE

    train = tmp_path / "train"
    train.mkdir()
    for i, size in enumerate((2, 2)):
        Image.fromarray(np.full((size, size, 3), 100 * i, np.uint8)).save(train / f"{i}.png")
    (train / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": "a"}) + "\n"
                                                  for i in range(2)))
    assert drawn.reader_images(tmp_path).shape == (2, 3, drawn.MAX_SIZE, drawn.MAX_SIZE)
    for i in range(2):
        Image.fromarray(np.zeros((MIN_SIZE, MIN_SIZE, 3), np.uint8)).save(train / f"{i}.png")
    assert drawn.reader_images(tmp_path).shape == (2, 3, MIN_SIZE, MIN_SIZE)
