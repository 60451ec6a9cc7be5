import pytest
import torch

from invdiff_rt.runtime.backends.torch_backend import TorchRuntime
from invdiff_rt.runtime.sampling import sample_images


def test_cpu_runtime_uses_no_cuda_graphs(tiny_model):
    rt = TorchRuntime(tiny_model)
    assert rt.name == "torch" and rt.cuda_graphs is False and rt.device.type == "cpu"


def test_cpu_step_is_traced_and_bit_identical_to_the_eager_fused_step(tiny_model, monkeypatch):
    """On CPU the fused step runs as a trace per batch shape (runtime/traced.py); its output is the eager module's,
    bit for bit, at every weight, guidance scale and timestep (the trace keeps them runtime inputs)."""
    from invdiff_rt.method.adapter import GuidanceAdapter, config_for_unet
    from invdiff_rt.runtime import traced

    monkeypatch.setattr(traced, "TRACE_AT", 1)  # traced at the first call of a shape
    torch.manual_seed(0)
    adapter = GuidanceAdapter(config_for_unet(tiny_model.unet, width=8, depth=1, time_dim=16))
    torch.nn.init.normal_(adapter.conv_out.weight, std=0.1)
    rt = TorchRuntime(tiny_model, adapter)
    emb = tiny_model.encode_text(["a red circle", "a blue square", "", ""])
    for seed, t, scale, weight in ((0, 900.0, 3.0, 1.0), (1, 100.0, 7.5, 0.5), (2, 500.0, 1.0, 2.0)):
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
        ts = torch.full((2,), t)
        with torch.inference_mode():
            eager = rt.fused(x, ts, emb, torch.tensor(scale), torch.tensor(weight))
        assert torch.equal(rt.denoise_step(x, ts, emb, scale, weight), eager)
    assert len(rt._traced[0]._graphs) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_step_matches_eager_and_recaptures_per_shape(tiny_model_dir):
    from invdiff_rt.models.loader import load_model

    model = load_model(tiny_model_dir, device="cuda")
    eager = TorchRuntime(model, cuda_graphs=False)
    graphed = TorchRuntime(model, cuda_graphs=True)
    for batch in (1, 3, 1):
        x = torch.randn(batch, 4, 8, 8, device="cuda")
        t = torch.full((batch,), 500.0, device="cuda")
        emb = model.encode_text(["a photo of the digit 1"] * batch + [""] * batch)
        torch.testing.assert_close(graphed.denoise_step(x, t, emb, 3.0, 1.0), eager.denoise_step(x, t, emb, 3.0, 1.0),
                                   atol=1e-4, rtol=1e-4)
    assert len(graphed._graphs) == 2
    a = sample_images(graphed, ["a photo of the digit 2"], [0], seed=0, steps=3)
    b = sample_images(eager, ["a photo of the digit 2"], [0], seed=0, steps=3)
    assert abs(a.astype(int) - b.astype(int)).max() <= 1


def test_cpu_step_at_weight_zero_skips_the_adapter(tiny_model):
    """eps + 0 * delta == eps: at weight 0 the adapter is not run (a non-finite adapter would otherwise poison the
    step with 0 * inf = NaN), and the step equals the adapter-free runtime's bitwise; at weight 1 it is run."""
    from invdiff_rt.method.adapter import GuidanceAdapter, config_for_unet

    adapter = GuidanceAdapter(config_for_unet(tiny_model.unet, width=8, depth=1, time_dim=16))
    torch.nn.init.constant_(adapter.conv_out.bias, float("inf"))
    rt, base = TorchRuntime(tiny_model, adapter), TorchRuntime(tiny_model)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((2,), 500.0)
    emb = tiny_model.encode_text(["a red circle", "a blue square", "", ""])
    assert torch.equal(rt.denoise_step(x, t, emb, 3.0, 0.0), base.denoise_step(x, t, emb, 3.0, 0.0))
    assert not torch.isfinite(rt.denoise_step(x, t, emb, 3.0, 1.0)).all()


def test_bench_eager_loop_skips_the_adapter_where_it_does_not_act(tiny_model):
    """The bench's `eager` contender (a hand-written diffusers loop) honours the adapter's from_t like our runtimes:
    a step at weight 0 does not call the adapter, and the same step equals the torch backend's."""
    from invdiff_rt.bench import EagerRuntime
    from invdiff_rt.method.adapter import GuidanceAdapter, config_for_unet
    from invdiff_rt.runtime.sampling import step_weight

    adapter = GuidanceAdapter(config_for_unet(tiny_model.unet, width=8, depth=1, time_dim=16))
    torch.nn.init.constant_(adapter.conv_out.bias, float("inf"))
    adapter.from_t = 800
    eager, base = EagerRuntime(tiny_model, adapter), TorchRuntime(tiny_model)
    assert step_weight(eager, 1.5, 799) == 0.0 and step_weight(eager, 1.5, 800) == 1.5
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((2,), 500.0)
    emb = tiny_model.encode_text(["a red circle", "a blue square", "", ""])
    torch.testing.assert_close(eager.denoise_step(x, t, emb, 3.0, 0.0), base.denoise_step(x, t, emb, 3.0, 0.0),
                               atol=1e-5, rtol=1e-5)
    assert not torch.isfinite(eager.denoise_step(x, t, emb, 3.0, 1.0)).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
def test_cuda_backends_without_a_gpu_are_one_line(tiny_model, tmp_path):
    from invdiff_rt.errors import InvdiffError
    from invdiff_rt.runtime.backends import load_runtime

    with pytest.raises(InvdiffError, match=r"^--backend onnxruntime-cuda: needs a CUDA GPU and the onnxruntime-gpu"):
        load_runtime("onnxruntime-cuda", export_dir=tmp_path)  # was torch's AssertionError, exit 1
    with pytest.raises(InvdiffError, match=r"^--backend torch-cuda: no CUDA GPU visible"):
        load_runtime("torch-cuda", model=tiny_model)
