"""runtime/traced.py: the CPU traces are bit-identical to eager, made once per shape, follow in-place weight changes,
fall back to eager, and keep no model alive."""

import gc
import weakref

import pytest
import torch

from invdiff_rt.runtime import traced
from invdiff_rt.runtime.traced import Traced, traced_eps


@pytest.fixture(autouse=True)
def trace_at_once(monkeypatch):
    """Every shape traced at its first call (by default at its `TRACE_AT`-th)."""
    monkeypatch.setattr(traced, "TRACE_AT", 1)


def test_a_shape_is_traced_at_its_trace_at_th_call(monkeypatch):
    monkeypatch.setattr(traced, "TRACE_AT", 3)
    lin = torch.nn.Linear(4, 2)
    step, x = Traced(lin), torch.randn(3, 4)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(step(x), lin(x)) and step._graphs == {}
        assert torch.equal(step(x), lin(x))
    assert list(step._calls.values()) == [3] and isinstance(next(iter(step._graphs.values())), torch.jit.ScriptModule)


def _inputs(model, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t, model.encode_text(["a photo of the digit 3"] * batch)


def test_traced_eps_is_bit_identical_and_traced_once_per_shape(tiny_model):
    eps = traced_eps(tiny_model.unet)
    assert traced_eps(tiny_model.unet) is eps  # one per module: every caller shares its traces
    with torch.inference_mode():
        for batch, seed in ((3, 0), (3, 1), (5, 2), (3, 3)):
            x, t, emb = _inputs(tiny_model, batch, seed)
            assert torch.equal(eps(x, t, emb), tiny_model.unet(x, t, encoder_hidden_states=emb).sample)
    assert len(eps._graphs) == 2  # batch 3 and batch 5
    with torch.no_grad():
        assert torch.equal(eps(x, t, emb), tiny_model.unet(x, t, encoder_hidden_states=emb).sample)
    assert len(eps._graphs) == 3  # another grad mode, another trace


def test_a_trace_follows_in_place_weight_changes():
    lin = torch.nn.Linear(4, 2)
    step = Traced(lin)
    x = torch.randn(3, 4)
    with torch.no_grad():
        before = step(x)
        lin.weight.mul_(2.0)
        assert torch.equal(step(x), lin(x)) and not torch.equal(step(x), before)


class _ToList(torch.nn.Module):
    def forward(self, x):
        return x.tolist()  # a Python list: torch.jit.trace refuses it


def test_an_untraceable_module_runs_eagerly():
    module = _ToList()  # held by the caller: a Traced holds it weakly
    step = Traced(module)
    x = torch.arange(3.0)
    assert step(x) == [0.0, 1.0, 2.0] and step._graphs == {(((3,), torch.float32), False, True): None}


def test_a_cached_trace_keeps_no_model_alive():
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1))

    class Unet(torch.nn.Module):  # the `unet(...).sample` calling convention
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, sample, timestep, encoder_hidden_states):
            return type("Out", (), {"sample": self.net(sample) + timestep[:, None, None, None]})()

    unet = Unet()
    with torch.no_grad():
        out = traced_eps(unet)(torch.ones(2, 4, 5, 5), torch.tensor([1.0, 2.0]), torch.zeros(2, 3, 4))
    assert out.shape == (2, 4, 5, 5) and torch.allclose(out[1] - out[0], torch.ones(4, 5, 5))
    alive = weakref.ref(unet)
    del unet, net
    gc.collect()
    assert alive() is None


def test_large_calls_run_eagerly():
    """From `MAX_ELEMENTS` on a trace is no faster (bench/results/traced_cpu_unet.json): such calls are not traced."""
    from invdiff_rt.runtime.traced import MAX_ELEMENTS

    module = torch.nn.Identity()
    step = Traced(module)
    with torch.no_grad():
        step(torch.zeros(MAX_ELEMENTS + 1))
        assert step._graphs == {}
        step(torch.zeros(MAX_ELEMENTS))
    assert list(step._graphs) == [(((MAX_ELEMENTS,), torch.float32), False, False)]
