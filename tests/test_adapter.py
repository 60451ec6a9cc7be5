import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel

from invdiff_rt.errors import InvdiffError
from invdiff_rt.method.adapter import (AdapterConfig, GuidanceAdapter, adapter_fingerprint, adapter_param_budget,
                                       check_record, config_for_unet, load_adapter, parameter_count, save_adapter)
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
    out = save_adapter(adapter, tmp_path / "ad", {"base_fingerprint": "a" * 64, "recipe": "erm", "lambda": 0.0,
                                                  "from_t": 700})
    manifest = json.loads((out / "adapter.json").read_text())
    assert manifest["parameter_count"] == parameter_count(adapter)
    assert manifest["config"]["width"] == 8 and "torch" in manifest["versions"]
    loaded = load_adapter(out, SimpleNamespace(fingerprint="a" * 64))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.from_t == 700 and GuidanceAdapter(adapter.config).from_t is None  # sampling.step_weight reads it
    x, t, ehs, eps = _inputs()
    with torch.no_grad():
        assert torch.equal(adapter(x, t, ehs, eps), loaded(x, t, ehs, eps))
    assert len(adapter_fingerprint(out)) == 64
    with pytest.raises(InvdiffError, match=r"adapter.json: trained for base aaaaaaaaaaaa, got bbbbbbbbbbbb; retrain"):
        load_adapter(out, SimpleNamespace(fingerprint="b" * 64))
    edited = {k: v for k, v in manifest.items() if k != "weights_sha256"}  # hand-edited: was a KeyError
    (out / "adapter.json").write_text(json.dumps(edited))
    with pytest.raises(InvdiffError, match=r"adapter.json: adapter manifest without weights_sha256; retrain"):
        load_adapter(out, SimpleNamespace(fingerprint="a" * 64))
    (out / "adapter.json").write_text(json.dumps(manifest))
    (out / "adapter.safetensors").write_bytes(b"corrupt")
    with pytest.raises(InvdiffError, match="adapter.safetensors: missing or does not match adapter.json; retrain"):
        load_adapter(out, SimpleNamespace(fingerprint="a" * 64))
    (out / "adapter.safetensors").unlink()
    (out / "adapter.safetensors").mkdir()  # a folder in its place was an IsADirectoryError traceback
    with pytest.raises(InvdiffError, match="adapter.safetensors: missing or does not match adapter.json; retrain"):
        load_adapter(out, SimpleNamespace(fingerprint="a" * 64))


MALFORMED = [  # hand-edited adapter.json fields that reached a TypeError deep inside sampling, and the line now
    ({"format_version": 99}, r"format_version 99, this invdiff-rt reads 1"),
    ({"from_t": "late"}, r"from_t 'late' is not a timestep"),
    ({"from_t": -100}, r"from_t -100 is not a timestep"),
    ({"recommended_weight": float("inf")}, r"recommended_weight inf is not a finite number"),
    ({"calibration": "oops"}, r"calibration.by_guidance_scale is not a table"),
    ({"calibration": {"by_guidance_scale": [1]}}, r"calibration.by_guidance_scale is not a table"),
    ({"calibration": {"by_guidance_scale": {"3": {"weight": None}}}}, r"by_guidance_scale\['3'\] is not a CFG scale"),
    ({"calibration": {"by_guidance_scale": {"3": {"weight": "high"}}}}, r"by_guidance_scale\['3'\]"),
    ({"calibration": {"by_guidance_scale": {"x": {"weight": 1.2}}}}, r"by_guidance_scale\['x'\]"),
    ({"config": [1]}, r"config \[1\] is not an adapter config"),
    ({"config": {"width": 8, "colour": 3}}, r"is not an adapter config"),
    ({"config": {"width": -5}}, r"config.width -5 is not a positive int"),
    ({"config": {"width": "wide"}}, r"config.width 'wide' is not a positive int"),
    ({"config": {"use_eps_base": 1}}, r"config.use_eps_base 1 is not a bool"),
    ({"second_split": [1]}, r"second_split \[1\] is not a record"),
    ({"second_split": {"joint_rows": [3, "x"]}}, r"second_split.joint_rows is not a list of row numbers"),
    ({"second_split": {"refined_rows": [-1]}}, r"second_split.refined_rows is not a list of row numbers"),
    ({"second_split": {"joint_fraction": 1.5}}, r"second_split.joint_fraction 1.5 is not in \(0, 1\]"),
    ({"second_split": {"finetune_temperature": 0}}, r"second_split.finetune_temperature 0 is not a positive number"),
]


@pytest.mark.parametrize("edit, message", MALFORMED)
def test_malformed_manifest_fields_fail_in_one_line(tmp_path, edit, message):
    adapter = GuidanceAdapter(AdapterConfig(cross_attention_dim=16, width=8, depth=1, time_dim=16))
    out = save_adapter(adapter, tmp_path / "ad", {"base_fingerprint": "a" * 64, "from_t": 700,
                                                  "calibration": {"by_guidance_scale": {"3": {"weight": 1.2}}}})
    manifest = json.loads((out / "adapter.json").read_text())
    load_adapter(out, SimpleNamespace(fingerprint="a" * 64))  # the written one loads
    if "config" in edit and isinstance(edit["config"], dict):
        edit = {"config": {**manifest["config"], **edit["config"]}}
    (out / "adapter.json").write_text(json.dumps({**manifest, **edit}))
    with pytest.raises(InvdiffError, match=rf"adapter.json: malformed \(.*{message}.*\); retrain with `invdiff train`"):
        load_adapter(out, SimpleNamespace(fingerprint="a" * 64))


def test_an_uncalibrated_manifest_passes_the_field_check():
    check_record({"config": dataclasses.asdict(AdapterConfig()), "from_t": None, "recommended_weight": None,
                  "calibration": None})
    check_record({"calibration": {}})
    check_record({})


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


def _tiny_inputs(n=12, seed=0):
    from invdiff_rt.method.cache import BaseInputs

    g = torch.Generator().manual_seed(seed)
    return BaseInputs(torch.randn(n, 4, 8, 8, generator=g), torch.arange(n) % 2, ["a", "b"],
                      torch.randn(2, 16, 16, generator=g), torch.zeros(1, 16, 16), "d" * 64, "b" * 64)


def test_gradient_only_into_adapter(unet):
    from diffusers import DDPMScheduler

    from invdiff_rt.method.grouper import group_erm
    from invdiff_rt.method.train import (TrainConfig, _step_loss, assert_only_adapter_trains, base_prediction,
                                        draw_batch)

    unet.requires_grad_(False)
    adapter = GuidanceAdapter(config_for_unet(unet))
    batch = draw_batch(_tiny_inputs(), group_erm(12), DDPMScheduler(), TrainConfig(batch_size=4), rank=0, step=0)
    eps_base = base_prediction(unet, batch, "cpu")
    assert not eps_base.requires_grad
    terms = _step_loss(adapter, batch, eps_base, lam=1.0, scale_aware=True, device="cpu")
    terms.loss.backward()
    assert_only_adapter_trains(unet, adapter)
    assert all(p.grad is None for p in unet.parameters())
    unet.conv_out.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="base parameters would train"):
        assert_only_adapter_trains(unet, adapter)
    unet.requires_grad_(False)


def test_batches_keep_index_and_group_rows_together_per_rank():
    from diffusers import DDPMScheduler

    from invdiff_rt.method.grouper import Grouping
    from invdiff_rt.method.train import TrainConfig, draw_batch

    n = 12
    rows = torch.stack([torch.arange(n).float(), -torch.arange(n).float()], dim=1)  # row i encodes i
    grouping = Grouping(rows, torch.zeros(n), torch.linspace(1, 3, n), torch.zeros(n, dtype=torch.bool))
    cfg, sched = TrainConfig(batch_size=16, seed=3), DDPMScheduler()
    b0 = draw_batch(_tiny_inputs(), grouping, sched, cfg, rank=0, step=5)
    b1 = draw_batch(_tiny_inputs(), grouping, sched, cfg, rank=1, step=5)
    for b in (b0, b1):
        assert torch.equal(b.group_weights[:, 0], b.index.float())
    assert not torch.equal(b0.index, b1.index)
    again = draw_batch(_tiny_inputs(), grouping, sched, cfg, rank=0, step=5)  # resumable: same (seed, rank, step)
    assert torch.equal(again.index, b0.index) and torch.equal(again.sample, b0.sample)
    active = TrainConfig(batch_size=256, seed=3, from_t=800, active_only=True)  # --active-only, from_t resolved
    assert int(draw_batch(_tiny_inputs(), grouping, sched, active, rank=0, step=5).timestep.min()) >= 800
    assert int(b0.timestep.min()) < 800 and TrainConfig().t_start == 0  # "auto" unresolved: every t


def test_weight_zero_reproduces_base_through_fused_denoiser(unet):
    from invdiff_rt.runtime.fused import FusedDenoiser

    torch.manual_seed(4)
    adapter = GuidanceAdapter(config_for_unet(unet)).eval()
    torch.nn.init.normal_(adapter.conv_out.weight)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100.0, 700.0])
    text = torch.randn(4, 16, 16)
    s = torch.tensor(2.0)
    with torch.no_grad():
        base = FusedDenoiser(unet, None)(x, t, text, s, torch.tensor(0.0))
        w0 = FusedDenoiser(unet, adapter)(x, t, text, s, torch.tensor(0.0))
        w1 = FusedDenoiser(unet, adapter)(x, t, text, s, torch.tensor(1.0))
    assert torch.equal(base, w0)
    assert not torch.allclose(base, w1)


def test_an_export_folder_given_as_adapter_says_so(tmp_path):
    from invdiff_rt.method.adapter import read_adapter_manifest

    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(InvdiffError, match=rf"^{tmp_path}: an export folder, not an adapter; pass it as --export"):
        read_adapter_manifest(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(InvdiffError, match=r"adapter.json: adapter manifest not found; pass the folder `invdiff"):
        read_adapter_manifest(tmp_path)
