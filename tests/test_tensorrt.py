"""TensorRT engine cache, refit mapping and CLI errors (no TensorRT needed), plus marked GPU/TRT tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from invdiff_rt import artifacts
from invdiff_rt.export.manifest import FORMAT
from invdiff_rt.errors import InvdiffError
from invdiff_rt.export import tensorrt as te

REPO = Path(__file__).resolve().parents[1]
GPU = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
PROFILE = {"sample": ((1, 4, 8, 8), (2, 4, 8, 8), (8, 4, 8, 8)), "encoder_hidden_states": ((2, 8, 16), (4, 8, 16),
                                                                                            (16, 8, 16))}
RUNTIME_FIELDS = {"latent_shape": [4, 8, 8], "scheduler_config": {}, "files": {}}  # what every export manifest records


def _ingredients(**overrides):
    args = dict(onnx_hash="a" * 64, profile=PROFILE, trt_version="11.4.0.106", gpu=GPU, refit_mode="individual",
                refit_weights=("adapter.conv_in.weight", "adapter.conv_out.bias"), builder_optimization_level=3)
    args.update(overrides)
    return te.key_ingredients(**args)


def _fake_plan(cache: Path, ingredients, payload: bytes = b"serialized-engine") -> Path:
    """A stand-in plan file (bytes only: the cache logic never parses it) committed with its sidecar."""
    plan = te.plan_path(cache, te.cache_key(ingredients))
    artifacts.atomic_write_bytes(plan, payload)
    te.write_sidecar(cache, ingredients, {"component": "denoiser", "build_seconds": 1.5})
    return plan


# --- cache keys -------------------------------------------------------------------------------------------------


def test_same_ingredients_give_same_key_and_profile_order_does_not_matter():
    reordered = dict(reversed(list(PROFILE.items())))
    assert te.cache_key(_ingredients()) == te.cache_key(_ingredients(profile=reordered))
    assert len(te.cache_key(_ingredients())) == te.KEY_LENGTH


@pytest.mark.parametrize("change", [
    dict(onnx_hash="b" * 64),
    dict(profile={**PROFILE, "sample": ((1, 4, 8, 8), (4, 4, 8, 8), (8, 4, 8, 8))}),
    dict(trt_version="11.3.0.1"),
    dict(gpu={"name": "NVIDIA H200", "compute_capability": "9.0"}),
    dict(gpu={**GPU, "compute_capability": "8.9"}),
    dict(refit_mode="none"),
    dict(refit_weights=("adapter.conv_in.weight",)),
    dict(builder_optimization_level=5),
])
def test_any_changed_ingredient_changes_the_key(change):
    assert te.cache_key(_ingredients(**change)) != te.cache_key(_ingredients())


def test_unknown_refit_mode_is_a_one_line_error():
    with pytest.raises(InvdiffError, match="--refit"):
        _ingredients(refit_mode="all")


# --- profiles from the export spec -----------------------------------------------------------------------------------


def _denoiser_spec():
    from invdiff_rt.export.spec import ExportSpec, TensorSpec

    inputs = (TensorSpec("sample", ("B", 4, 8, 8)), TensorSpec("timestep", ("B",), "float32"),
              TensorSpec("text_embeddings", ("2B", 16, 32)), TensorSpec("guidance_scale", (), "float32"),
              TensorSpec("adapter_weight", (), "float32"))
    return ExportSpec("denoiser", inputs, (TensorSpec("noise_pred", ("B", 4, 8, 8)),), 1, 4, 32, "fp16")


def test_profile_comes_from_the_manifest_spec():
    entry = json.loads(json.dumps({"file": "denoiser.onnx", "spec": _denoiser_spec().to_json()}))
    profile = te.component_profile(entry)
    assert profile == {
        "sample": ((1, 4, 8, 8), (4, 4, 8, 8), (32, 4, 8, 8)),
        "timestep": ((1,), (4,), (32,)),
        "text_embeddings": ((2, 16, 32), (8, 16, 32), (64, 16, 32)),
        "guidance_scale": ((), (), ()),
        "adapter_weight": ((), (), ()),
    }
    assert te.component_profile({"profile": {"x": [[1, 2], [2, 2], [4, 2]]}}) == {"x": ((1, 2), (2, 2), (4, 2))}


def test_trt_runtime_reads_latent_shape_from_the_spec():
    from invdiff_rt.runtime.backends.tensorrt_backend import _latent_shape

    manifest = {"components": {"denoiser": {"spec": _denoiser_spec().to_json()}}}
    assert _latent_shape(json.loads(json.dumps(manifest))) == (4, 8, 8)


# --- sidecars and stale detection ----------------------------------------------------------------------------------


def test_fresh_plan_with_sidecar_is_loadable(tmp_path):
    ingredients = _ingredients()
    plan = _fake_plan(tmp_path, ingredients)
    assert te.stale_reason(tmp_path, ingredients) is None
    sidecar = json.loads(plan.with_suffix(".json").read_text())
    assert sidecar["key"] == plan.stem
    assert sidecar["plan_sha256"] == artifacts.sha256_bytes(b"serialized-engine")
    assert sidecar["plan_bytes"] == len(b"serialized-engine")
    assert sidecar["ingredients"]["profile"]["sample"] == [[1, 4, 8, 8], [2, 4, 8, 8], [8, 4, 8, 8]]
    assert "python" in sidecar["versions"]
    assert te.read_sidecar_for(plan)["build_seconds"] == 1.5


def test_missing_plan_or_sidecar_means_rebuild(tmp_path):
    ingredients = _ingredients()
    assert te.stale_reason(tmp_path, ingredients) == "no engine"
    artifacts.atomic_write_bytes(te.plan_path(tmp_path, te.cache_key(ingredients)), b"half-built")
    assert te.stale_reason(tmp_path, ingredients) == "no sidecar"


def test_corrupted_plan_is_detected(tmp_path):
    ingredients = _ingredients()
    plan = _fake_plan(tmp_path, ingredients)
    plan.write_bytes(b"serialized-enginX")
    assert "corrupted" in te.stale_reason(tmp_path, ingredients)
    with pytest.raises(InvdiffError, match=r"--engine .*corrupted.*invdiff build"):
        te.read_sidecar_for(plan)


def test_foreign_sidecar_is_detected(tmp_path):
    """A plan built by another TensorRT version / GPU copied under this key: its sidecar disagrees."""
    ingredients = _ingredients()
    plan = _fake_plan(tmp_path, ingredients)
    sidecar = json.loads(plan.with_suffix(".json").read_text())
    sidecar["ingredients"]["tensorrt"] = "10.8.0"
    plan.with_suffix(".json").write_text(json.dumps(sidecar))
    assert "foreign or stale" in te.stale_reason(tmp_path, ingredients)
    plan.with_suffix(".json").write_text("{not json")
    assert te.stale_reason(tmp_path, ingredients) == "unreadable sidecar"


def test_renamed_plan_is_refused(tmp_path):
    plan = _fake_plan(tmp_path, _ingredients())
    other = tmp_path / ("0" * te.KEY_LENGTH + ".plan")
    other.write_bytes(plan.read_bytes())
    other.with_suffix(".json").write_text(plan.with_suffix(".json").read_text())
    with pytest.raises(InvdiffError, match="cache key"):
        te.read_sidecar_for(other)


def test_refit_ingredients_make_a_new_entry_and_strip_back_to_the_base():
    base = _ingredients()
    a, b = te.refit_ingredients(base, "f" * 64), te.refit_ingredients(base, "e" * 64)
    assert len({te.cache_key(base), te.cache_key(a), te.cache_key(b)}) == 3
    assert {k: v for k, v in a.items() if k != "adapter_sha256"} == base


def test_refit_into_cache_keys_each_adapter_once_and_chains_back(tmp_path, monkeypatch):
    """The cache logic around TensorRT's refit (only `refit_plan` needs a GPU): one entry per (base, adapter), a
    second refit to the same adapter is a cache hit, and refitting the refitted plan back keys on the base."""
    calls = []

    def fake_refit(engine, arrays, out):
        calls.append((Path(engine).stem, Path(out).stem))
        artifacts.atomic_write_bytes(out, b"refit:" + Path(out).stem.encode())

    monkeypatch.setattr(te, "refit_plan", fake_refit)
    base_ingredients = _ingredients()
    base = _fake_plan(tmp_path, base_ingredients)
    to_b = te.refit_into_cache(base, {}, "b" * 64, tmp_path, {"adapter": "B"})
    assert to_b == te.plan_path(tmp_path, te.cache_key(te.refit_ingredients(base_ingredients, "b" * 64)))
    assert te.refit_into_cache(base, {}, "b" * 64, tmp_path) == to_b and calls == [(base.stem, to_b.stem)]
    sidecar = te.read_sidecar_for(to_b)
    assert sidecar["refit_from"] == base.stem and sidecar["adapter"] == "B"
    back = te.refit_into_cache(to_b, {}, "a" * 64, tmp_path)
    assert back == te.plan_path(tmp_path, te.cache_key(te.refit_ingredients(base_ingredients, "a" * 64)))
    assert te.read_sidecar_for(back)["refit_from"] == to_b.stem and len(calls) == 2


def test_default_timing_cache_is_per_gpu_and_trt_version(tmp_path):
    path = te.default_timing_cache(tmp_path, GPU, "11.4.0.106")
    assert path.name == "timing-nvidia-h100-80gb-hbm3-sm90-trt11.4.0.106.cache"
    assert te.default_timing_cache(tmp_path, {**GPU, "name": "NVIDIA H200"}, "11.4.0.106") != path


# --- ONNX side of the refit map -------------------------------------------------------------------------------------


def _tiny_adapter(seed: int):
    from invdiff_rt.method.adapter import AdapterConfig, GuidanceAdapter

    torch.manual_seed(seed)
    adapter = GuidanceAdapter(AdapterConfig(in_channels=4, cross_attention_dim=16, width=8, depth=1, time_dim=8))
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p))
    return adapter.eval()


def _export_adapter_onnx(adapter, path: Path) -> Path:
    """A small fp32 ONNX graph whose initializers are the adapter's weights (stand-in for the denoiser export)."""
    args = (torch.randn(2, 4, 8, 8), torch.full((2,), 10.0), torch.randn(2, 8, 16), torch.randn(2, 4, 8, 8))
    torch.onnx.export(adapter, args, str(path), dynamo=False, do_constant_folding=False, opset_version=17,
                      input_names=["sample", "timestep", "encoder_hidden_states", "eps_base"], output_names=["delta"])
    return path


@pytest.fixture(scope="module")
def adapter_onnx(tmp_path_factory):
    adapter = _tiny_adapter(0)
    path = _export_adapter_onnx(adapter, tmp_path_factory.mktemp("onnx") / "adapter.onnx")
    state = {k: v.detach().clone() for k, v in adapter.state_dict().items()}
    return path, state, {name: name for name in state}


def test_every_adapter_tensor_maps_to_exactly_one_initializer_with_identical_values(adapter_onnx):
    import onnx
    from onnx import numpy_helper

    path, state, mapping = adapter_onnx
    te.verify_refit_map(path, state, mapping)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    assert len(set(mapping.values())) == len(state) == 18
    for name, init in mapping.items():
        np.testing.assert_array_equal(inits[init], state[name].numpy())


def test_refit_map_errors_name_the_problem(adapter_onnx):
    path, state, mapping = adapter_onnx
    first, second = sorted(mapping)[:2]
    with pytest.raises(InvdiffError, match="one-to-one"):
        te.verify_refit_map(path, state, {**mapping, first: mapping[second]})
    with pytest.raises(InvdiffError, match="does not hold"):
        te.verify_refit_map(path, {**state, first: state[first] + 1}, mapping)
    with pytest.raises(InvdiffError, match="missing"):
        te.verify_refit_map(path, state, {**mapping, first: "nope"})


def test_refit_arrays_cover_every_weight_in_the_graph_dtype(adapter_onnx):
    path, _, mapping = adapter_onnx
    new_state = {k: v.detach() for k, v in _tiny_adapter(1).state_dict().items()}
    specs = te.initializer_specs(path, list(mapping.values()))
    arrays = te.refit_arrays(new_state, mapping, specs)
    assert set(arrays) == set(mapping.values())  # all of them, not only the changed ones (TRT #3628)
    for name, init in mapping.items():
        assert arrays[init].dtype == np.float32 and arrays[init].flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(arrays[init], new_state[name].numpy())
    fp16_specs = {k: (shape, np.dtype(np.float16)) for k, (shape, _) in specs.items()}
    w = "conv_in.weight"
    np.testing.assert_array_equal(te.refit_arrays(new_state, mapping, fp16_specs)[w],
                                  new_state[w].numpy().astype(np.float16))


def test_refit_arrays_refuse_another_architecture(adapter_onnx):
    path, state, mapping = adapter_onnx
    specs = te.initializer_specs(path, list(mapping.values()))
    with pytest.raises(InvdiffError, match="--adapter.*architecture"):
        te.refit_arrays({k: v for k, v in state.items() if k != "conv_in.bias"}, mapping, specs)
    with pytest.raises(InvdiffError, match="--adapter: conv_in.weight has shape"):
        te.refit_arrays({**state, "conv_in.weight": torch.zeros(8, 4, 3, 3)}, mapping, specs)
    with pytest.raises(InvdiffError, match="not in the graph"):
        te.initializer_specs(path, ["missing.weight"])


def test_onnx_hash_covers_external_data(tmp_path, adapter_onnx):
    import onnx

    path, _, _ = adapter_onnx
    model = onnx.load(str(path))
    ext = tmp_path / "ext.onnx"
    onnx.save_model(model, str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    before = te.onnx_sha256(ext)
    assert before != artifacts.sha256_file(ext)
    data = bytearray((tmp_path / "ext.onnx.data").read_bytes())
    data[0] ^= 1
    (tmp_path / "ext.onnx.data").write_bytes(bytes(data))
    assert te.onnx_sha256(ext) != before
    assert te.onnx_sha256(path) == artifacts.sha256_file(path)


# --- adapter compatibility --------------------------------------------------------------------------------------------


def test_adapter_must_match_exported_architecture_and_base():
    config = {"in_channels": 4, "width": 8}
    manifest = {"adapter": {"config": config, "base_fingerprint": "base1"}, "refit_map": {"w": "w"}}
    te.check_adapter_compatible(manifest, {"config": config, "base_fingerprint": "base1"}, "new")
    with pytest.raises(InvdiffError, match="--adapter new: architecture"):
        te.check_adapter_compatible(manifest, {"config": {**config, "width": 16}, "base_fingerprint": "base1"}, "new")
    with pytest.raises(InvdiffError, match="--adapter new: trained for base"):
        te.check_adapter_compatible(manifest, {"config": config, "base_fingerprint": "base2"}, "new")
    with pytest.raises(InvdiffError, match="^--adapter new: the engine.s export has no adapter to refit"):
        te.check_adapter_compatible({}, {"config": config}, "new")


# --- CLI without TensorRT -------------------------------------------------------------------------------------------


def _tensorrt_installed() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_tensorrt_installed(), reason="TensorRT is installed here")
@pytest.mark.parametrize("argv", [["build", "--onnx", "export/none", "--out", "engines"],
                                  ["refit", "--engine", "engines/x.plan", "--adapter", "adapters/x"]])
def test_cli_without_tensorrt_prints_one_line_and_exits_2(tmp_path, argv):
    for folder in ("export/none", "adapters/x", "engines"):  # valid paths: the missing TensorRT is the error
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "engines" / "x.plan").write_bytes(b"plan")
    before = sorted(tmp_path.rglob("*"))
    proc = subprocess.run([sys.executable, "-m", "invdiff_rt.cli", *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"invdiff {argv[0]}: TensorRT is not installed" in lines[0]
    assert "pip install 'invdiff-rt[trt]'" in lines[0]
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.skipif(_tensorrt_installed(), reason="TensorRT is installed here")
@pytest.mark.parametrize("argv, flag", [
    (["generate", "--export", "export/none", "--backend", "tensorrt", "--prompt", "x", "--out", "images"], "--backend"),
    (["check", "--model", "colored-digits", "--export", "export/none", "--backends", "torch,tensorrt"], "--backends"),
    (["bench", "--export", "export/none", "--backends", "tensorrt", "--json", "bench.json"], "--backends")])
def test_tensorrt_backend_without_tensorrt_is_refused_before_anything_loads(tmp_path, argv, flag):
    (tmp_path / "export/none").mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-m", "invdiff_rt.cli", *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {flag} tensorrt: TensorRT is not installed; install the [trt] "
                                                "extra on a machine with an NVIDIA GPU (pip install 'invdiff-rt[trt]')"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["export", "none"]  # no model loaded, nothing written


def test_require_tensorrt_message_names_the_command():
    if _tensorrt_installed():
        pytest.skip("TensorRT is installed here")
    with pytest.raises(InvdiffError, match=r"^invdiff refit: TensorRT is not installed; install the \[trt\] extra"):
        te.require_tensorrt("invdiff refit")


def test_export_manifest_errors_are_one_line(tmp_path):
    with pytest.raises(InvdiffError, match="--onnx .*not an export folder"):
        te.export_components(tmp_path / "missing")
    good = {"format": FORMAT, "components": {"denoiser": {"file": "denoiser.onnx", "profile": PROFILE}},
            **RUNTIME_FIELDS}
    spec = _denoiser_spec().to_json()
    for bad, what in (({"components": good["components"]}, "not an invdiff-rt export manifest"),
                      ({**good, "components": {"denoiser": {}}}, "malformed \\(KeyError: 'spec'\\)"),
                      ({**good, "components": {"denoiser": "x"}}, "malformed \\(TypeError"),
                      ({**good, "components": {"denoiser": {"spec": {**spec, "max_batch": "two"}}}}, "malformed"),
                      ({**good, "refit_map": ["a"]}, "malformed \\(ValueError"),
                      ({**good, "latent_shape": "4x8x8"}, "malformed \\(ValueError"),
                      ({**good, "components": {"vae": good["components"]["denoiser"]}},
                       "malformed \\(KeyError: 'denoiser'"),
                      *(({k: v for k, v in good.items() if k != key}, f"malformed \\(KeyError: '{key}'")
                        for key in RUNTIME_FIELDS),
                      ({**good, "precision": "int8"}, "malformed \\(ValueError: precision 'int8', not one of"),
                      ({**good, "image_size": "big"}, "malformed \\(ValueError: image_size 'big' is not a positive"),
                      ({**good, "adapter": {"from_t": "late"}}, "malformed \\(ValueError: from_t 'late' is not a"),
                      ({**good, "adapter": {"calibration": {"by_guidance_scale": {"3": {"weight": None}}}}},
                       "malformed \\(ValueError: calibration.by_guidance_scale\\['3'\\] is not a CFG scale"),
                      ({**good, "format_version": 2},
                       "malformed \\(ValueError: format_version 2, this invdiff-rt reads 1"),
                      ({**good, "components": {"denoiser": {"spec": {**spec, "sizes": [[32, 32], [64, 64]]}}}},
                       "malformed \\(ValueError: spec.sizes must be")):
        (tmp_path / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(InvdiffError, match=f"^{tmp_path / 'manifest.json'}: {what}"):
            te.export_components(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(good))
    (comp,) = te.export_components(tmp_path)
    assert comp.profile == PROFILE and comp.onnx == tmp_path / "denoiser.onnx"
    with pytest.raises(InvdiffError, match="--component: 'vae' is not in"):
        te.export_components(tmp_path, ["vae"])
    with pytest.raises(InvdiffError, match="missing; re-run `invdiff export`"):
        te.verify_onnx(comp)


def test_trt_runtime_without_tensorrt_is_a_one_line_error(tmp_path):
    if _tensorrt_installed():
        pytest.skip("TensorRT is installed here")
    from invdiff_rt.runtime.backends.tensorrt_backend import load

    # named as the backend, not as one command: generate, eval, check and bench all load it
    with pytest.raises(InvdiffError, match=r"^the tensorrt backend \(--backend/--backends tensorrt\): TensorRT is not "
                                           r"installed; install the \[trt\] extra"):
        load(tmp_path, tmp_path / "engines")


# --- the real export (fused UNet + adapter + CFG) ----------------------------------------------------------------


def _random_adapter(unet, seed: int):
    from invdiff_rt.method.adapter import GuidanceAdapter, config_for_unet

    torch.manual_seed(seed)
    adapter = GuidanceAdapter(config_for_unet(unet, width=8, depth=1))
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return adapter.eval()


def _export_denoiser(tmp_path: Path, adapter_seed: int, precision: str = "fp32", device: str = "cpu"):
    """Tiny random model -> fused denoiser ONNX through the export engineer's code; (path, spec, adapter, map)."""
    from invdiff_rt.export.onnx_export import adapter_weights, component_module, export_onnx, refit_map
    from invdiff_rt.export.spec import denoiser_spec
    from invdiff_rt.models.loader import load_model
    from invdiff_rt.models.tiny import save_random_model

    model_dir = tmp_path / "model"
    if not model_dir.exists():
        save_random_model(model_dir, ["a red digit", "a blue digit"], seed=0)
    model = load_model(model_dir, device=device)
    adapter = _random_adapter(model.unet, adapter_seed).to(device)
    module = component_module("denoiser", model, adapter, precision=precision)
    weights = adapter_weights(module)
    mapping = refit_map(weights)
    spec = denoiser_spec(model, max_batch=4, precision=precision)
    path = tmp_path / f"denoiser-{adapter_seed}-{precision}.onnx"
    export_onnx(module, spec, path, weights=weights)
    return path, spec, adapter, mapping, module


@pytest.mark.slow
def test_exported_denoiser_keeps_every_adapter_weight_as_one_initializer(tmp_path):
    path, _, adapter, mapping, _ = _export_denoiser(tmp_path, adapter_seed=0)
    state = adapter.state_dict()
    te.verify_refit_map(path, state, mapping)  # one initializer per tensor, identical fp32 values
    specs = te.initializer_specs(path, list(mapping.values()))
    assert set(te.refit_arrays(state, mapping, specs)) == set(mapping.values())


# --- GPU + TensorRT (skipped here; run on the project's GPU machine) ---------------------------------------------


def _engine_output(plan: Path, inputs: dict):
    from invdiff_rt.runtime.backends.tensorrt_backend import EngineRunner

    runner = EngineRunner(plan, use_cuda_graph=False)
    out = runner({name: x.cuda() for name, x in inputs.items()})
    return next(iter(out.values())).float().cpu()


@pytest.mark.gpu
@pytest.mark.trt
def test_refit_matches_a_fresh_build_and_switching_back_is_exact(tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    path_a, spec, adapter_a, mapping, module_a = _export_denoiser(tmp_path, 0, "fp16", "cuda")
    path_b, _, adapter_b, _, _ = _export_denoiser(tmp_path, 1, "fp16", "cuda")
    options = te.BuildOptions(builder_optimization_level=0)
    weights = tuple(sorted(mapping.values()))
    plan_a = te.build_engine(path_a, spec.profile(), tmp_path / "engines", options, weights, "denoiser")
    plan_b = te.build_engine(path_b, spec.profile(), tmp_path / "engines", options, weights, "denoiser")
    assert te.build_engine(path_a, spec.profile(), tmp_path / "engines", options, weights) == plan_a  # cached
    inputs = spec.sample_inputs(2, seed=3)
    with torch.inference_mode():
        torch_a = module_a(*[x.cuda() for x in inputs.values()]).float().cpu()
    out_a = _engine_output(plan_a, inputs)
    assert (out_a - torch_a).abs().max().item() < 5e-2 * max(torch_a.abs().max().item(), 1.0)
    specs = te.initializer_specs(path_a, list(mapping.values()))
    cache = tmp_path / "engines"
    to_b = te.refit_into_cache(plan_a, te.refit_arrays(adapter_b.state_dict(), mapping, specs), "b" * 64, cache)
    refit_b, fresh_b = _engine_output(to_b, inputs), _engine_output(plan_b, inputs)
    assert (refit_b - fresh_b).abs().max().item() < 1e-2 * max(fresh_b.abs().max().item(), 1.0)
    assert (refit_b - out_a).abs().max().item() > 0  # the adapter really changed
    back = te.refit_into_cache(to_b, te.refit_arrays(adapter_a.state_dict(), mapping, specs), "a" * 64, cache)
    torch.testing.assert_close(_engine_output(back, inputs), out_a, rtol=0, atol=1e-3)  # no A/B blend (#3628)


def _fake_export(tmp_path: Path, adapter_onnx, base: str = "base-fp"):
    """An export folder in the manifest layout `invdiff build/refit` read, around the small adapter ONNX."""
    import shutil

    from invdiff_rt.method.adapter import save_adapter

    from invdiff_rt.method.adapter import adapter_fingerprint

    path, state, mapping = adapter_onnx
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(path, export / "denoiser.onnx")
    adapter = _tiny_adapter(0)
    save_adapter(adapter, tmp_path / "adapter_a", {"base_fingerprint": base})
    config = json.loads((tmp_path / "adapter_a" / "adapter.json").read_text())["config"]
    artifacts.atomic_write_json(export / "manifest.json", {
        "format": FORMAT, "components": {"denoiser": {"file": "denoiser.onnx", "sha256": artifacts.sha256_file(path),
                                    "profile": PROFILE}},
        "refit_map": mapping, "adapter": {"config": config, "base_fingerprint": base,
                                          "fingerprint": adapter_fingerprint(tmp_path / "adapter_a")},
        **RUNTIME_FIELDS})
    ingredients = _ingredients(onnx_hash=te.onnx_sha256(export / "denoiser.onnx"),
                               refit_weights=tuple(mapping.values()))
    plan = _fake_plan(tmp_path / "engines", ingredients)
    sidecar = json.loads(plan.with_suffix(".json").read_text())
    sidecar["onnx"] = str(export / "denoiser.onnx")
    artifacts.atomic_write_json(plan.with_suffix(".json"), sidecar)
    return export, plan, adapter


def test_refit_checks_adapter_and_export_before_touching_the_engine(tmp_path, adapter_onnx):
    from invdiff_rt.method.adapter import save_adapter

    export, plan, adapter = _fake_export(tmp_path, adapter_onnx)
    save_adapter(_tiny_adapter(1), tmp_path / "other_base", {"base_fingerprint": "another-base"})
    with pytest.raises(InvdiffError, match="--adapter .*other_base: trained for base another-bas"):
        te.refit_export_engine(plan, tmp_path / "other_base")
    save_adapter(_tiny_adapter(1), tmp_path / "adapter_b", {"base_fingerprint": "base-fp"})
    (export / "denoiser.onnx").write_bytes((export / "denoiser.onnx").read_bytes() + b"\0")
    with pytest.raises(InvdiffError, match="edited after export"):
        te.refit_export_engine(plan, tmp_path / "adapter_b")


@pytest.mark.skipif(_tensorrt_installed(), reason="TensorRT is installed here")
def test_refit_with_a_compatible_adapter_reaches_tensorrt(tmp_path, adapter_onnx):
    from invdiff_rt.method.adapter import save_adapter

    _, plan, _ = _fake_export(tmp_path, adapter_onnx)
    save_adapter(_tiny_adapter(1), tmp_path / "adapter_b", {"base_fingerprint": "base-fp"})
    with pytest.raises(InvdiffError, match="invdiff refit: TensorRT is not installed"):
        te.refit_export_engine(plan, tmp_path / "adapter_b")
    assert sorted(p.name for p in plan.parent.iterdir()) == sorted([plan.name, plan.with_suffix(".json").name])


def test_generate_finds_the_engine_refitted_with_its_adapter(tmp_path, adapter_onnx):
    """`invdiff generate --export E --backend tensorrt --adapter B` loads the plan `invdiff refit` made for B (its
    own cache entry), not the export's own engine (which serves the exported adapter A); without that plan the error
    names the refit command; an adapter of another base is refused first; the runtime samples with B's from_t."""
    from invdiff_rt.method.adapter import adapter_fingerprint, save_adapter

    export, plan, _ = _fake_export(tmp_path, adapter_onnx)
    engines = tmp_path / "engines"
    assert te.engine_plans(export, engines, "11.4.0.106", GPU) == {"denoiser": plan}
    assert te.engine_plans(export, engines, "11.4.0.106", GPU, adapter_dir=tmp_path / "adapter_a") == {
        "denoiser": plan}  # the exported adapter: the built engine carries it, no refit needed
    save_adapter(_tiny_adapter(1), tmp_path / "adapter_b", {"base_fingerprint": "base-fp", "from_t": 650})
    with pytest.raises(InvdiffError, match=rf"denoiser engine: no engine; run `invdiff refit --engine {plan} "
                                           rf"--adapter {tmp_path / 'adapter_b'}`"):
        te.engine_plans(export, engines, "11.4.0.106", GPU, adapter_dir=tmp_path / "adapter_b")
    base = json.loads(plan.with_suffix(".json").read_text())["ingredients"]
    refitted = _fake_plan(engines, te.refit_ingredients(base, adapter_fingerprint(tmp_path / "adapter_b")))
    found = te.engine_plans(export, engines, "11.4.0.106", GPU, adapter_dir=tmp_path / "adapter_b")
    assert found == {"denoiser": refitted} and refitted != plan
    save_adapter(_tiny_adapter(1), tmp_path / "other_base", {"base_fingerprint": "another-base"})
    with pytest.raises(InvdiffError, match="trained for base another-bas"):
        te.engine_plans(export, engines, "11.4.0.106", GPU, adapter_dir=tmp_path / "other_base")
    with pytest.raises(InvdiffError, match="built without refittable weights"):
        te.engine_plans(export, engines, "11.4.0.106", GPU, refit_mode="none", adapter_dir=tmp_path / "adapter_b")
    manifest = te.refitted_manifest(json.loads((export / "manifest.json").read_text()), tmp_path / "adapter_b")
    assert manifest["adapter"]["from_t"] == 650 and manifest["refit_map"]


def test_generate_takes_an_export_adapter_only_for_tensorrt(tmp_path, monkeypatch):
    from invdiff_rt import validate
    from invdiff_rt.runtime import backends
    from invdiff_rt.runtime.generate import check_export_adapter

    with pytest.raises(InvdiffError, match="^--adapter: an export folder already contains its adapter.*tensorrt"):
        validate._generate_combos({"prompt": ["p"], "export": tmp_path, "adapter": tmp_path, "backend": "openvino"})
    check_export_adapter(tmp_path, tmp_path, "tensorrt")  # accepted: the engine's refitted adapter
    check_export_adapter(tmp_path, None, "torch")  # --model + --adapter: as before
    # `auto` counts as what it resolves to: openvino on this CPU machine (refused), tensorrt where it is usable
    with pytest.raises(InvdiffError, match="the backend here is (openvino|onnxruntime)"):
        validate._generate_combos({"prompt": ["p"], "export": tmp_path, "adapter": tmp_path, "backend": "auto"})
    monkeypatch.setattr(backends, "is_available", lambda name: name == "tensorrt")
    validate._generate_combos({"prompt": ["p"], "export": tmp_path, "adapter": tmp_path, "backend": "auto"})


def test_engines_built_with_other_build_options_are_found(tmp_path, adapter_onnx):
    """`invdiff build --builder-optimization-level 5` or `--refit none` makes plans under other keys: the runtime
    finds them (the asked-for options first); a refit needs a refittable build."""
    from invdiff_rt.method.adapter import save_adapter

    export, default_plan, _ = _fake_export(tmp_path, adapter_onnx)
    engines = tmp_path / "engines"
    base = json.loads(default_plan.with_suffix(".json").read_text())["ingredients"]
    default_plan.unlink()
    level5 = _fake_plan(engines, {**base, "builder_optimization_level": 5})
    assert te.engine_plans(export, engines, "11.4.0.106", GPU) == {"denoiser": level5}
    level5.unlink()
    no_refit = _fake_plan(engines, {**base, "refit": "none", "refit_weights": []})
    assert te.engine_plans(export, engines, "11.4.0.106", GPU) == {"denoiser": no_refit}
    save_adapter(_tiny_adapter(1), tmp_path / "adapter_b", {"base_fingerprint": "base-fp"})
    with pytest.raises(InvdiffError, match=r"denoiser engine: no engine; run `invdiff refit --engine .*\(after"):
        te.engine_plans(export, engines, "11.4.0.106", GPU, adapter_dir=tmp_path / "adapter_b")
    again = _fake_plan(engines, base)  # both built: the asked-for options win
    assert te.engine_plans(export, engines, "11.4.0.106", GPU) == {"denoiser": again}
    assert te.build_variants("individual", 3, refit=True)[:2] == [("individual", 3), ("individual", 0)]
    assert len(te.build_variants("none", 5, refit=False)) == 12


def test_build_plan_keys_name_this_machines_tensorrt_and_gpu_or_say_they_are_placeholders(adapter_onnx, tmp_path,
                                                                                          monkeypatch):
    """`invdiff build --plan` keys the plan `invdiff build` would write here: with TensorRT and a GPU present their
    version and name (the placeholders never name a real engine), and it says when they are placeholders."""
    import shutil

    from typer.testing import CliRunner

    from invdiff_rt.cli import app

    path, _, _ = adapter_onnx
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(path, export / "denoiser.onnx")
    artifacts.atomic_write_json(export / "manifest.json", {"format": FORMAT, "components": {"denoiser": {
        "file": "denoiser.onnx", "sha256": artifacts.sha256_file(path), "profile": PROFILE}}, **RUNTIME_FIELDS})
    options = te.BuildOptions()
    monkeypatch.setattr(te, "_installed_tensorrt", lambda: None)
    monkeypatch.setattr(te, "_has_cuda", lambda: False)
    (row,) = te.build_plan(export, options)
    assert (row["tensorrt"], row["gpu"]) == (te.PLACEHOLDER_TRT, te.PLACEHOLDER_GPU)
    result = CliRunner().invoke(app, ["build", "--onnx", str(export), "--plan"])
    text = " ".join(result.output.split())  # rich wraps at 80 columns here
    assert result.exit_code == 0 and "placeholders: on the GPU machine with TensorRT the key differs" in text
    gpu = {"name": "NVIDIA H100", "compute_capability": "9.0"}
    monkeypatch.setattr(te, "_installed_tensorrt", lambda: "10.9.0")
    monkeypatch.setattr(te, "_has_cuda", lambda: True)
    monkeypatch.setattr(te, "gpu_identity", lambda: gpu)
    (real,) = te.build_plan(export, options)
    expected = _ingredients(onnx_hash=te.onnx_sha256(export / "denoiser.onnx"), trt_version="10.9.0", gpu=gpu,
                            refit_weights=())
    assert (real["tensorrt"], real["gpu"]) == ("10.9.0", gpu) and real["key"] != row["key"]
    assert real["key"] == te.cache_key(expected)
    result = CliRunner().invoke(app, ["build", "--onnx", str(export), "--plan"])
    assert result.exit_code == 0 and "placeholders" not in result.output
    assert real["key"] in result.output.replace("\n", "")
