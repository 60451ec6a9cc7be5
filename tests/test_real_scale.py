"""Real scale (issue 13): SD-class configs, dynamic resolution, prediction types, NaN guard, stock diffusers loading.

The SD-scale runs themselves live in bench/real_scale.sh; these tests use the tiny model (and meta-device SD
modules, which hold no weights)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from invdiff_rt.errors import InvdiffError
from invdiff_rt.runtime import resolution

PROMPTS = ["a red circle", "a blue square"]


def _meta_params(module_cls, **config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in module_cls(**config).parameters())


def test_sd_configs_have_sd_parameter_counts():
    """The literal configs give SD's published parameter counts (UNet 859.5M / 865.9M, VAE 83.7M)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from invdiff_rt.models import sd

    assert _meta_params(UNet2DConditionModel, **sd.SD15_UNET) == 859_520_964
    assert _meta_params(UNet2DConditionModel, **sd.SD21_UNET) == 865_910_724
    assert _meta_params(AutoencoderKL, **sd.SD15_VAE) == 83_653_863
    assert sd.VARIANTS["sd21"]["prediction_type"] == "v_prediction" and sd.SD21_TEXT["hidden_size"] == 1024
    with pytest.raises(InvdiffError, match="--variant sd3"):
        sd.variant("sd3")


def test_seeded_init_is_deterministic_and_scaled():
    from invdiff_rt.models.sd import seeded_init_

    a, b = (seeded_init_(torch.nn.Sequential(torch.nn.Linear(400, 300), torch.nn.LayerNorm(300)), 3) for _ in "ab")
    assert torch.equal(a[0].weight, b[0].weight)
    assert abs(float(a[0].weight.detach().std()) - 400 ** -0.5) < 2e-3 and float(a[0].bias.abs().max()) == 0.0
    assert float(a[1].weight.min()) == 1.0


# ------------------------------------------------------------------------------------------ resolution


def _limits(lo=(256, 256), hi=(768, 768)):
    return resolution.SizeLimits(4, 8, 64, (512, 512), lo, hi, "--export e")


@pytest.mark.parametrize("variant, prediction", [("sd15", "epsilon"), ("sd21", "v_prediction")])
def test_build_sd_manifest_records_the_variant_and_versions(tmp_path, monkeypatch, variant, prediction):
    """What `model build-sd` writes beside the weights (here on tiny components: the SD-sized build is 3.4 GB)."""
    from invdiff_rt.models import sd
    from invdiff_rt.models.configs import MiniSDArch
    from invdiff_rt.models.loader import load_model
    from invdiff_rt.models.tiny import build_components

    monkeypatch.setattr(sd, "build_sd_components",
                        lambda name, seed: build_components(MiniSDArch(), ["a photo of a cat"], seed))
    out = sd.build_sd(variant, tmp_path / variant, seed=5)
    info = json.loads((out / "invdiff_model.json").read_text())
    assert (info["recipe"], info["variant"], info["seed"], info["prediction_type"]) == (f"random-{variant}", variant,
                                                                                         5, prediction)
    assert info["versions"]["torch"] == torch.__version__ and info["weights_dtype"] == "float32"
    model = load_model(out)
    assert info["sample_size"] == model.unet.config.sample_size and model.scheduler_config["prediction_type"] == \
        prediction
    assert info["params"]["unet"] == sum(p.numel() for p in model.unet.parameters())


def test_size_checks_one_line_errors():
    limits = _limits()
    assert resolution.check_size(limits, 512, 768) == (512, 768)
    assert resolution.check_size(limits) == (512, 512)
    assert limits.latent_shape((384, 512)) == (4, 48, 64)
    with pytest.raises(InvdiffError, match=r"^--height/--width 520x512: not a multiple of 64 \(VAE factor 8 x UNet 8\)"):
        resolution.check_size(limits, 520, 512)
    with pytest.raises(InvdiffError, match=r"outside the range of --export e \(256x256 to 768x768\)"):
        resolution.check_size(limits, 1024, 512)


def test_export_sizes_from_flags():
    base = resolution.SizeLimits(4, 8, 64, (512, 512))
    assert resolution.export_sizes(base) is None
    assert resolution.export_sizes(base, "256", "768") == ((256, 256), (512, 512), (768, 768))
    assert resolution.export_sizes(base, sizes="512x384,768x512") == ((512, 384), (512, 384), (768, 512))
    with pytest.raises(InvdiffError, match="--min-size 300x300: not a multiple of 64"):
        resolution.export_sizes(base, "300", "768")
    with pytest.raises(InvdiffError, match="--min-size 768x768: larger than --max-size"):
        resolution.export_sizes(base, "768", "512")
    with pytest.raises(InvdiffError, match="^--sizes 512x300: not a multiple of 64"):  # the flag given, not --min-size
        resolution.export_sizes(base, sizes="512x512,512x300")
    with pytest.raises(InvdiffError, match="^--sizes 520x520: not a multiple"):  # an inner entry (the profile's opt
        resolution.export_sizes(base, sizes="520,512,768")  # when first) was never checked
    with pytest.raises(InvdiffError, match="^--sizes 512x600: not a multiple"):
        resolution.export_sizes(base, sizes="512,512x600,768")
    with pytest.raises(InvdiffError, match="^--sizes ,: no size given"):  # was min() of an empty list
        resolution.export_sizes(base, sizes=",")
    # one bound alone beyond the model's size: the other is that bound (it said "larger than --max-size 512x512")
    assert resolution.export_sizes(base, "768") == ((768, 768), (768, 768), (768, 768))
    assert resolution.export_sizes(base, max_size="256") == ((256, 256), (256, 256), (256, 256))
    assert resolution.export_sizes(base, "256") == ((256, 256), (512, 512), (512, 512))
    with pytest.raises(InvdiffError, match="^--max-size 100x100: not a multiple"):  # under the flag given
        resolution.export_sizes(base, max_size="100")


def test_spec_symbolic_sizes_profile_and_round_trip(tmp_path):
    from types import SimpleNamespace

    from invdiff_rt.export.spec import ExportSpec, component_specs

    model = SimpleNamespace(latent_shape=(4, 8, 8), image_size=32, vae_factor=4, size_multiple=16,
                            tokenizer=SimpleNamespace(model_max_length=16),
                            text_encoder=SimpleNamespace(config=SimpleNamespace(hidden_size=24, vocab_size=50)))
    specs = component_specs(model, max_batch=8, sizes=((16, 16), (32, 32), (64, 48)))
    den, vae, text = specs["denoiser"], specs["vae_decoder"], specs["text_encoder"]
    assert den.tensor("sample").dims == ("B", 4, "h", "w") and vae.tensor("images").dims == ("B", 3, "H", "W")
    assert den.profile()["sample"] == ((1, 4, 4, 4), (4, 4, 8, 8), (8, 4, 16, 12))
    assert vae.shapes(2, (48, 32))["images"] == (2, 3, 48, 32) and den.trace_size() == (32, 48)
    assert text.profile()["input_ids"] == ((1, 16), (4, 16), (16, 16))  # text stays static (L)
    assert ExportSpec.from_json(json.loads(json.dumps(den.to_json()))) == den
    manifest = {"components": {"denoiser": {"spec": den.to_json()}}, "latent_shape": [4, 8, 8], "scheduler_config": {},
                "files": {}}
    assert resolution.limits_of_manifest(manifest).default == (32, 32)  # the model's size, inside the range
    above = component_specs(model, max_batch=8, sizes=((48, 48), (48, 64), (64, 64)))["denoiser"]
    manifest["components"]["denoiser"]["spec"] = above.to_json()  # a range without the model's own 32x32
    assert resolution.limits_of_manifest(manifest).default == (48, 64)  # was 32x32: refused by check, made by OV
    from invdiff_rt.export.manifest import FORMAT

    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format": FORMAT}))
    assert resolution.requested_latent_shape(export=tmp_path) == (4, 12, 16)  # what generate and bench sample at
    assert resolution.requested_latent_shape(export=tmp_path, height=64, width=64) == (4, 16, 16)
    manifest["components"]["denoiser"]["spec"] = den.to_json()
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format": FORMAT}))
    assert resolution.requested_latent_shape(export=tmp_path) is None  # the runtime's own (the model's) size
    static = component_specs(model, max_batch=8)["denoiser"]  # the model's factors, not the defaults (8, 8)
    assert (static.sizes, static.downsample, static.multiple, static.tensor("sample").dims) == (None, 4, 16,
                                                                                                ("B", 4, 8, 8))


@pytest.fixture(scope="module")
def dynamic_export(tmp_path_factory, tiny_model_dir):
    """The tiny model exported once with a resolution range 32..64 px (latents 8..16)."""
    from invdiff_rt.export.manifest import export_model

    out = tmp_path_factory.mktemp("dyn") / "export"
    return export_model(tiny_model_dir, out, max_batch=4, sizes=((32, 32), (32, 32), (64, 64)))


@pytest.mark.slow
def test_dynamic_export_symbolic_dims_and_parity_off_export_size(dynamic_export, tiny_model):
    """H/W stay symbolic (no exporter guard specialised them) and ORT matches torch at sizes != the trace size."""
    from invdiff_rt.export.manifest import read_manifest
    from invdiff_rt.runtime.backends.onnxruntime_backend import OrtRuntime
    from invdiff_rt.runtime.backends.torch_backend import TorchRuntime

    manifest = read_manifest(dynamic_export)
    assert manifest["components"]["denoiser"]["inputs"]["sample"]["shape"] == ["B", 4, "h", "w"]
    assert manifest["components"]["vae_decoder"]["outputs"]["images"]["shape"] == ["B", 3, "H", "W"]
    ort, ref = OrtRuntime(dynamic_export), TorchRuntime(tiny_model)
    gen = torch.Generator().manual_seed(0)
    for batch, (h, w) in ((1, (8, 8)), (3, (16, 8)), (2, (12, 16))):
        x, t = torch.randn(batch, 4, h, w, generator=gen), torch.tensor([700.0, 300.0, 50.0][:batch])
        emb = torch.randn(2 * batch, 16, 16, generator=gen)
        a, b = ort.denoise_step(x, t, emb, 3.0, 1.0), ref.denoise_step(x, t, emb, 3.0, 1.0)
        assert float((a - b).norm() / b.norm()) < 1e-4
        assert ort.decode(x).shape == (batch, 3, 4 * h, 4 * w)
        assert float((ort.decode(x) - ref.decode(x)).abs().max()) < 1e-4


@pytest.mark.slow
def test_generate_non_square_from_dynamic_export(dynamic_export, tmp_path):
    from PIL import Image

    from invdiff_rt.runtime.generate import generate

    generate(["a photo of the digit 1"], tmp_path, export=dynamic_export, backend="onnxruntime", num=2, steps=3,
             height=48, width=32, grid=False, progress=False)
    pngs = sorted(tmp_path.rglob("0000*.png"))
    assert len(pngs) == 2 and np.asarray(Image.open(pngs[0])).shape == (48, 32, 3)
    assert json.loads((tmp_path / "run.json").read_text())["settings"]["latent_shape"] == [4, 12, 8]


@pytest.mark.slow
def test_fp16_export_keeps_fragile_ops_fp32(tiny_model_dir, tmp_path):
    """Every Softmax, InstanceNormalization (GroupNorm) and LayerNormalization of the fp16 graphs reads fp32."""
    import onnx
    from onnx import TensorProto, shape_inference

    from invdiff_rt.export.fp16 import FP32_OPS
    from invdiff_rt.export.manifest import export_model

    out = export_model(tiny_model_dir, tmp_path / "e16", precision="fp16", components=("denoiser", "text_encoder"))
    for name, expected in (("denoiser", {"Softmax", "InstanceNormalization", "LayerNormalization"}),
                           ("text_encoder", {"Softmax", "LayerNormalization"})):
        graph = shape_inference.infer_shapes(onnx.load(str(out / f"{name}.onnx"))).graph
        types = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input)}
        fragile = [n for n in graph.node if n.op_type in FP32_OPS]
        assert {n.op_type for n in fragile} == expected
        assert all(types[n.input[0]] == TensorProto.FLOAT for n in fragile), name
        assert types[graph.input[0].name] in (TensorProto.FLOAT16, TensorProto.INT64)


def _fake_export(root, lo=(32, 32), hi=(64, 64)):
    """A manifest-only export folder with a resolution range (sizes are checked before anything is loaded)."""
    from types import SimpleNamespace

    from invdiff_rt.export.manifest import FORMAT
    from invdiff_rt.export.spec import denoiser_spec

    model = SimpleNamespace(latent_shape=(4, 8, 8), image_size=32, vae_factor=4, size_multiple=16,
                            tokenizer=SimpleNamespace(model_max_length=16),
                            text_encoder=SimpleNamespace(config=SimpleNamespace(hidden_size=16, vocab_size=50)))
    spec = denoiser_spec(model, sizes=(lo, lo, hi))
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"format": FORMAT, "latent_shape": [4, 8, 8], "scheduler_config": {},
                                                    "files": {}, "components": {
        "denoiser": {"spec": spec.to_json()}}}))
    return root


def test_size_errors_before_any_work(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from invdiff_rt.cli import app

    export, out = _fake_export(tmp_path / "export"), tmp_path / "images"
    base = ["generate", "--prompt", "a photo of the digit 1", "--num", "1", "--out", str(out)]
    for args, message in ((["--export", str(export), "--height", "96", "--width", "32"],
                           "--height/--width 96x32: outside the range of --export"),
                          (["--export", str(export), "--height", "40"], "--height/--width 40x32: not a multiple of 16"),
                          (["--model", str(tiny_model_dir), "--width", "24"], "not a multiple of 16")):
        result = CliRunner().invoke(app, base + args)
        assert isinstance(result.exception, InvdiffError) and message in str(result.exception)
        assert "\n" not in str(result.exception) and not out.exists()
    result = CliRunner().invoke(app, ["check", "--model", str(tiny_model_dir), "--export", str(export),
                                      "--height", "128"])
    assert isinstance(result.exception, InvdiffError) and "outside the range" in str(result.exception)


def test_forced_nan_exit_2_one_line_no_png(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The test hook makes step 2's noise prediction NaN: exit 2, one line naming component and step, no PNG."""
    from invdiff_rt import cli

    out = tmp_path / "new" / "images"  # its parent is made for the run too
    monkeypatch.setenv("INVDIFF_FORCE_NAN_STEP", "2")
    monkeypatch.setattr(sys, "argv", ["invdiff", "generate", "--model", str(tiny_model_dir), "--prompt",
                                      "a photo of the digit 1", "--num", "2", "--out", str(out), "--steps", "3",
                                      "--backend", "torch"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "torch denoiser: non-finite values (NaN/inf) at step 2 of 3" in lines[0]
    assert "fp32" in lines[0] and "lower --guidance-scale" in lines[0] and not out.parent.exists()  # nothing left
    monkeypatch.delenv("INVDIFF_FORCE_NAN_STEP")  # so the corrected rerun is not refused by a run.json
    cli.main()
    assert len(list(out.rglob("0000*.png"))) == 2


def test_nan_guard_on_torch_backend(tiny_model, monkeypatch):
    from invdiff_rt.runtime.sampling import sample_images

    monkeypatch.setenv("INVDIFF_FORCE_NAN_STEP", "9")  # read on the 8-step boundary's next check (the end)
    with pytest.raises(InvdiffError, match=r"^torch denoiser: non-finite values \(NaN/inf\) at step 9 of 10;"):
        sample_images(tiny_model, ["a red circle"], [0], seed=0, steps=10)


# ------------------------------------------------------------------------------------------ prediction types


def test_denoising_target_per_prediction_type():
    from diffusers import DDPMScheduler

    from invdiff_rt.method.losses import denoising_target
    from invdiff_rt.models.configs import SCHEDULER_CONFIG

    gen = torch.Generator().manual_seed(0)
    x0, eps, t = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen), torch.tensor([0, 500, 999])
    abar = DDPMScheduler.from_config(SCHEDULER_CONFIG).alphas_cumprod[t].view(-1, 1, 1, 1)
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0  # hand-computed velocity
    cfg = dict(SCHEDULER_CONFIG)
    assert torch.equal(denoising_target({**cfg, "prediction_type": "epsilon"}, x0, eps, t), eps)
    assert torch.equal(denoising_target({**cfg, "prediction_type": "sample"}, x0, eps, t), x0)
    assert torch.allclose(denoising_target({**cfg, "prediction_type": "v_prediction"}, x0, eps, t), v, atol=1e-6)
    with pytest.raises(InvdiffError, match="prediction_type 'flow' is not supported"):
        denoising_target({**cfg, "prediction_type": "flow"}, x0, eps, t)


def _v_scheduler():
    from diffusers import DDPMScheduler

    from invdiff_rt.models.configs import SCHEDULER_CONFIG

    return DDPMScheduler.from_config({**SCHEDULER_CONFIG, "prediction_type": "v_prediction"})


def test_v_prediction_group_losses_equal_hand_computed(tiny_model):
    """groups' per-sample loss on a v-prediction model: ||unet(x_t) - v||^2 with v = sqrt(a) eps - sqrt(1-a) x0."""
    from invdiff_rt.method.losses import denoising_losses

    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t, emb = torch.tensor([10, 400, 900]), torch.randn(2, 16, 16, generator=gen)
    ids = torch.tensor([0, 1, 0])
    losses = denoising_losses(tiny_model.unet, _v_scheduler(), x0, emb, ids, t, eps, batch_size=2)
    a = _v_scheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    with torch.no_grad():
        pred = tiny_model.unet(x_t, t, encoder_hidden_states=emb[ids]).sample
    hand = (pred - (a.sqrt() * eps - (1 - a).sqrt() * x0)).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(losses.float(), hand, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(hand, (pred - eps).pow(2).mean(dim=(1, 2, 3)), rtol=1e-2)  # eps would differ


def test_v_prediction_training_target_and_loss(tiny_model):
    """train's batch target is v = (sqrt(a) x_t - x0) / sqrt(1-a), and a zero adapter's loss is ||eps_base - v||^2."""
    from types import SimpleNamespace

    from invdiff_rt.method.adapter import GuidanceAdapter, config_for_unet
    from invdiff_rt.method.train import TrainConfig, _step_loss, draw_batch

    gen = torch.Generator().manual_seed(2)
    inputs = SimpleNamespace(latents=torch.randn(6, 4, 8, 8, generator=gen), prompt_ids=torch.tensor([0, 1] * 3),
                             text_embeddings=torch.randn(2, 16, 16, generator=gen),
                             uncond_embedding=torch.zeros(1, 16, 16))
    grouping = SimpleNamespace(sampling=torch.full((6,), 1 / 6), weights=torch.ones(6, 1))
    batch = draw_batch(inputs, grouping, _v_scheduler(), TrainConfig(batch_size=4, seed=0, target="noise"), 0, 0)
    a = _v_scheduler().alphas_cumprod[batch.timestep].view(-1, 1, 1, 1)
    v = (a.sqrt() * batch.sample - inputs.latents[batch.index]) / (1 - a).sqrt()
    assert torch.allclose(batch.noise, v, atol=1e-4)
    adapter = GuidanceAdapter(config_for_unet(tiny_model.unet, width=8, depth=1, time_dim=16))
    eps_base = torch.randn(4, 4, 8, 8, generator=gen)
    terms = _step_loss(adapter, batch, eps_base, 0.0, True, "cpu")  # one group, lambda 0: the mean loss
    assert torch.allclose(terms.loss, (eps_base - v).pow(2).mean(), rtol=1e-4)


def test_v_prediction_rb_target_is_the_posterior_velocity():
    """The default `rb` target (an eps-space posterior mean) is mapped to v = (eps_hat - sqrt(1-a) x_t) / sqrt(a)."""
    from types import SimpleNamespace

    from invdiff_rt.method.targets import Posterior
    from invdiff_rt.method.train import TrainConfig, draw_batch

    gen = torch.Generator().manual_seed(3)
    inputs = SimpleNamespace(latents=torch.randn(6, 4, 8, 8, generator=gen), prompt_ids=torch.tensor([0, 1] * 3),
                             text_embeddings=torch.randn(2, 16, 16, generator=gen),
                             uncond_embedding=torch.zeros(1, 16, 16))
    grouping = SimpleNamespace(sampling=torch.full((6,), 1 / 6), weights=torch.ones(6, 1))
    sched = _v_scheduler()
    config = TrainConfig(batch_size=4, seed=0, target="rb", caption_dropout=0.0)
    batch = draw_batch(inputs, grouping, sched, config, 0, 0)
    eps_hat = Posterior.build(inputs.latents, inputs.prompt_ids, grouping.sampling).eps(
        batch.sample, batch.timestep, inputs.prompt_ids[batch.index], sched.alphas_cumprod)
    a = sched.alphas_cumprod[batch.timestep].view(-1, 1, 1, 1)
    assert torch.allclose(batch.target, (eps_hat - (1 - a).sqrt() * batch.sample) / a.sqrt(), atol=1e-3)


@pytest.mark.parametrize("name,prompt", [("colored-digits", "a photo of the digit 3"), ("shapes-habitats", "a circle"),
                                         ("styled-digits", "a photo of the digit 3")])
def test_stock_diffusers_loads_shipped_models_without_dtype(name, prompt):
    """`StableDiffusionPipeline.from_pretrained(dir)` with no dtype: every component fp32, a real image out."""
    from diffusers import StableDiffusionPipeline

    from invdiff_rt.models.loader import resolve_model

    pipe = StableDiffusionPipeline.from_pretrained(resolve_model(name))
    assert {getattr(pipe, c).dtype for c in ("unet", "vae", "text_encoder")} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt, num_inference_steps=4, guidance_scale=3.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    assert float(image.std()) > 0.05 and 0.02 < float(image.mean()) < 0.98  # not black, white or flat


def test_static_export_accepts_only_its_size(tmp_path):
    """An export without a range (older manifests too) runs at its model's size; another size is refused."""
    from invdiff_rt.export.manifest import FORMAT
    from invdiff_rt.export.spec import TensorSpec, ExportSpec

    spec = ExportSpec("denoiser", (TensorSpec("sample", ("B", 4, 8, 8)),), (TensorSpec("noise_pred", ("B", 4, 8, 8)),))
    root = tmp_path / "static"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"format": FORMAT, "latent_shape": [4, 8, 8], "scheduler_config": {},
                                                    "image_size": 32, "files": {},
                                                    "components": {"denoiser": {"spec": spec.to_json()}}}))
    assert resolution.requested_latent_shape(export=root, height=32, width=32) == (4, 8, 8)
    with pytest.raises(InvdiffError, match=r"48x32: outside the range of --export .* \(32x32 to 32x32\)"):
        resolution.requested_latent_shape(export=root, height=48)
