import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel

from invdiff_rt.errors import InvdiffError
from invdiff_rt.method.adapter import (AdapterConfig, GuidanceAdapter, adapter_fingerprint, adapter_param_budget,
                                       config_for_unet, load_adapter, parameter_count, save_adapter)
from invdiff_rt.models.configs import TinyArch


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**TinyArch().unet_kwargs()).eval()


def _inputs(b=3, c=4, hw=8, L=16, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, hw, hw, generator=g), torch.tensor([10.0, 500.0, 999.0][:b]),
            torch.randn(b, L, d, generator=g), torch.randn(b, c, hw, hw, generator=g))


def test_zero_init_delta_is_exactly_zero_and_trainable():
    adapter = GuidanceAdapter(AdapterConfig(cross_attention_dim=16, width=16, depth=2, time_dim=32))
    x, t, ehs, eps = _inputs()
    delta = adapter(x, t, ehs, eps)
    assert delta.shape == x.shape and torch.equal(delta, torch.zeros_like(delta))
    delta.pow(2).sum().backward()  # zero output, but the last layer still receives gradient from a real loss
    loss = (adapter(x, t, ehs, eps) - eps).pow(2).mean()
    adapter.zero_grad()
    loss.backward()
    assert adapter.conv_out.weight.grad.abs().sum() > 0


def test_config_for_unet_fits_budget(unet):
    config = config_for_unet(unet)
    assert config.in_channels == 4 and config.cross_attention_dim == 16
    n = parameter_count(GuidanceAdapter(config))
    assert n <= adapter_param_budget(unet) == int(0.05 * parameter_count(unet))
    assert n > 0.25 * adapter_param_budget(unet)  # not needlessly tiny


def test_save_load_round_trip_and_fingerprint_mismatch(tmp_path):
    torch.manual_seed(1)
    adapter = GuidanceAdapter(AdapterConfig(cross_attention_dim=16, width=8, depth=1, time_dim=16))
    torch.nn.init.normal_(adapter.conv_out.weight)  # non-zero output so the round trip is meaningful
    out = save_adapter(adapter, tmp_path / "ad", {"base_fingerprint": "a" * 64, "recipe": "erm", "lambda": 0.0})
    manifest = json.loads((out / "adapter.json").read_text())
    assert manifest["parameter_count"] == parameter_count(adapter)
    assert manifest["config"]["width"] == 8 and "torch" in manifest["versions"]
    loaded = load_adapter(out, SimpleNamespace(fingerprint="a" * 64))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x, t, ehs, eps = _inputs()
    with torch.no_grad():
        assert torch.equal(adapter(x, t, ehs, eps), loaded(x, t, ehs, eps))
    assert len(adapter_fingerprint(out)) == 64
    with pytest.raises(InvdiffError, match=r"adapter.json: trained for base aaaaaaaaaaaa, got bbbbbbbbbbbb; retrain"):
        load_adapter(out, SimpleNamespace(fingerprint="b" * 64))
    (out / "adapter.safetensors").write_bytes(b"corrupt")
    with pytest.raises(InvdiffError, match="adapter.safetensors"):
        load_adapter(out, SimpleNamespace(fingerprint="a" * 64))


@pytest.mark.slow
def test_onnx_export_dynamic_batch(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(2)
    adapter = GuidanceAdapter(AdapterConfig(cross_attention_dim=16, width=8, depth=2, time_dim=16)).eval()
    torch.nn.init.normal_(adapter.conv_out.weight)
    x, t, ehs, eps = _inputs(b=2)
    batch = torch.export.Dim.DYNAMIC
    path = tmp_path / "adapter.onnx"
    torch.onnx.export(adapter, (x, t, ehs, eps), str(path), dynamo=True, opset_version=18, external_data=False,
                      input_names=["sample", "timestep", "encoder_hidden_states", "eps_base"],
                      dynamic_shapes=({0: batch}, {0: batch}, {0: batch}, {0: batch}))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert isinstance(sess.get_inputs()[0].shape[0], str)  # symbolic batch
    x3, t3, ehs3, eps3 = _inputs(b=3, seed=5)
    (got,) = sess.run(None, {"sample": x3.numpy(), "timestep": t3.numpy(), "encoder_hidden_states": ehs3.numpy(),
                             "eps_base": eps3.numpy()})
    with torch.no_grad():
        want = adapter(x3, t3, ehs3, eps3).numpy()
    assert abs(got - want).max() < 1e-4
