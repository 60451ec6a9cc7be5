"""ONNX export of the fused step (+ text encoder, VAE decoder): symbolic batch dims, parity with torch at batch
sizes other than the export one, runtime scalars, manifest hashes, refit map, bad inputs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from invdiff_rt import artifacts
from invdiff_rt.errors import InvdiffError
from invdiff_rt.export.spec import ExportSpec, denoiser_spec, resolve_dim

PROMPTS = ["a red circle", "a blue square"]
_CACHE: dict = {}


def make_adapter(model, out_dir, base_fingerprint=None, seed=1):
    """A tiny random adapter with a NON-zero output conv (a zero-init adapter would hide export bugs)."""
    from invdiff_rt.method.adapter import GuidanceAdapter, config_for_unet, save_adapter

    torch.manual_seed(seed)
    adapter = GuidanceAdapter(config_for_unet(model.unet, width=8, depth=1, time_dim=16))
    torch.nn.init.normal_(adapter.conv_out.weight, std=0.2)
    torch.nn.init.normal_(adapter.conv_out.bias, std=0.2)
    return save_adapter(adapter, out_dir, {"base_fingerprint": base_fingerprint or model.fingerprint, "from_t": 600})


def exported_folder(tmp_path_factory) -> dict:
    """Export the tiny model + adapter once per test session (shared with test_check.py)."""
    if not _CACHE:
        from invdiff_rt.export.manifest import export_model
        from invdiff_rt.method.adapter import load_adapter
        from invdiff_rt.models.loader import load_model
        from invdiff_rt.models.tiny import save_random_model

        root = tmp_path_factory.mktemp("export")
        model_dir = save_random_model(root / "model", PROMPTS, seed=0)
        model = load_model(model_dir)
        adapter_dir = make_adapter(model, root / "adapter")
        out = export_model(model_dir, root / "export" / "tiny", adapter_dir, max_batch=8)
        _CACHE.update(model_dir=model_dir, model=model, adapter_dir=adapter_dir,
                      adapter=load_adapter(adapter_dir, model), out=out,
                      manifest=json.loads((out / "manifest.json").read_text()))
    return _CACHE


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return exported_folder(tmp_path_factory)


def _fake_model():
    return SimpleNamespace(latent_shape=(4, 8, 8), image_size=32, vae_factor=4, size_multiple=16,
                           tokenizer=SimpleNamespace(model_max_length=16),
                           text_encoder=SimpleNamespace(config=SimpleNamespace(hidden_size=24, vocab_size=50)))


def test_spec_shapes_profile_and_json_roundtrip():
    spec = denoiser_spec(_fake_model(), cfg=True, max_batch=8)
    assert spec.input_names == ["sample", "timestep", "text_embeddings", "guidance_scale", "adapter_weight"]
    assert spec.shapes(3) == {"sample": (3, 4, 8, 8), "timestep": (3,), "text_embeddings": (6, 16, 24),
                              "guidance_scale": (), "adapter_weight": (), "noise_pred": (3, 4, 8, 8)}
    assert spec.profile()["text_embeddings"] == ((2, 16, 24), (8, 16, 24), (16, 16, 24))
    assert spec.profile()["guidance_scale"] == ((), (), ())
    assert ExportSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert set(spec.dynamic_shapes()) == set(spec.input_names) and spec.dynamic_shapes()["guidance_scale"] is None
    inputs = spec.sample_inputs(2, dtype="fp16")
    assert inputs["sample"].dtype == torch.float16 and inputs["timestep"].dtype == torch.float32
    assert 0 <= float(inputs["timestep"].min()) and float(inputs["timestep"].max()) <= 999
    no_cfg = denoiser_spec(_fake_model(), cfg=False)
    assert "guidance_scale" not in no_cfg.input_names and no_cfg.shapes(3)["text_embeddings"] == (3, 16, 24)
    assert resolve_dim("2B", 5) == 10 and resolve_dim(7, 5) == 7


def _io_dims(path):
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in list(model.graph.input) + list(model.graph.output) if vi.name not in inits}


def test_onnx_batch_dims_are_symbolic(exported):
    dims = _io_dims(exported["out"] / "denoiser.onnx")
    assert dims == {"sample": ["B", 4, 8, 8], "timestep": ["B"], "text_embeddings": ["2B", 16, 16],
                    "guidance_scale": [], "adapter_weight": [], "noise_pred": ["B", 4, 8, 8]}
    assert _io_dims(exported["out"] / "text_encoder.onnx") == {"input_ids": ["B", 16],
                                                                "text_embeddings": ["B", 16, 16]}
    assert _io_dims(exported["out"] / "vae_decoder.onnx") == {"latents": ["B", 4, 8, 8], "images": ["B", 3, 32, 32]}
    assert exported["manifest"]["components"]["denoiser"]["inputs"]["text_embeddings"]["shape"] == ["2B", 16, 16]


def _ort_and_torch(exported, batch, guidance=3.0, weight=1.0, seed=0):
    import onnxruntime as ort

    from invdiff_rt.runtime.fused import FusedDenoiser

    spec = ExportSpec.from_json(exported["manifest"]["components"]["denoiser"]["spec"])
    inputs = spec.sample_inputs(batch, seed=seed)
    inputs["guidance_scale"], inputs["adapter_weight"] = torch.tensor(guidance), torch.tensor(weight)
    session = ort.InferenceSession(str(exported["out"] / "denoiser.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        ref = FusedDenoiser(exported["model"].unet, exported["adapter"])(**inputs).numpy()
    return out, ref


@pytest.mark.parametrize("batch", [1, 3])  # the export traced batch 2
def test_fused_onnx_matches_torch_at_other_batch_sizes(exported, batch):
    out, ref = _ort_and_torch(exported, batch)
    assert out.shape == (batch, 4, 8, 8)
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel <= 1e-4, rel


def test_guidance_and_adapter_weight_are_runtime_inputs(exported):
    base, _ = _ort_and_torch(exported, 2, guidance=3.0, weight=1.0)
    other_scale, ref_scale = _ort_and_torch(exported, 2, guidance=5.0, weight=1.0)
    other_weight, ref_weight = _ort_and_torch(exported, 2, guidance=3.0, weight=0.0)
    assert np.abs(other_scale - base).max() > 1e-3 and np.abs(other_weight - base).max() > 1e-3
    assert np.allclose(other_scale, ref_scale, atol=1e-4) and np.allclose(other_weight, ref_weight, atol=1e-4)


def _run(source, inputs) -> np.ndarray:
    return _session_outputs(source, inputs)[0]


def test_cpu_runtimes_load_the_adapter_gated_denoiser(exported):
    """export/gate.py: every adapter weight is read only inside If(adapter_weight != 0); at weight 0 the gated graph
    gives the ungated one's output bitwise (eps + 0 * delta == eps), at 1.5 within fp32 reordering; the text encoder
    (no adapter_weight) is loaded from its path as it is."""
    import onnx

    from invdiff_rt.export.gate import cpu_model_source

    manifest, path = exported["manifest"]["components"], exported["out"] / "denoiser.onnx"
    source = cpu_model_source(path, ExportSpec.from_json(manifest["denoiser"]["spec"]))
    model = onnx.load_from_string(source)
    (gate,) = [n for n in model.graph.node if n.op_type == "If"]
    then = next(a.g for a in gate.attribute if a.name == "then_branch")
    weights = {i.name for i in model.graph.initializer if i.name.startswith("adapter.")}
    assert len(weights) >= 10 and not weights & {i for n in model.graph.node for i in n.input}
    assert weights <= {i for n in then.node for i in n.input}
    inputs = ExportSpec.from_json(manifest["denoiser"]["spec"]).sample_inputs(3, seed=0)
    for weight in (0.0, 1.5):
        inputs.update(guidance_scale=np.float32(3.0), adapter_weight=np.float32(weight))
        ungated, gated = _run(str(path), inputs), _run(source, inputs)
        assert np.array_equal(gated, ungated) if weight == 0 else np.allclose(gated, ungated, atol=1e-5, rtol=1e-5)
    text = exported["out"] / "text_encoder.onnx"
    assert cpu_model_source(text, ExportSpec.from_json(manifest["text_encoder"]["spec"])) == str(text)


def test_openvino_split_reproduces_the_fused_denoiser(exported):
    """export/gate.py split_graph: the base graph reads no adapter weight and no adapter_weight input, and gives the
    fused graph's output at weight 0 (plus eps); the side graph (the adapter's nodes and the combine, nothing of the
    UNet) on that eps gives the fused output at 0 and 1.5."""
    import onnx

    from invdiff_rt.export.gate import cpu_model_parts

    manifest, path = exported["manifest"]["components"], exported["out"] / "denoiser.onnx"
    spec = ExportSpec.from_json(manifest["denoiser"]["spec"])
    base_bytes, side_bytes = cpu_model_parts(path, spec)
    base, side = onnx.load_from_string(base_bytes), onnx.load_from_string(side_bytes)
    read = lambda graph: {i for n in graph.node for i in n.input}  # noqa: E731
    assert not any(i.name.startswith("adapter.") for i in base.graph.initializer)
    assert "adapter_weight" not in {i.name for i in base.graph.input} | read(base.graph)
    side_weights = {i.name for i in side.graph.initializer}
    assert any(w.startswith("adapter.") for w in side_weights) and not any("unet." in w for w in side_weights)
    assert len(side.graph.node) < len(base.graph.node) / 4
    inputs = spec.sample_inputs(3, seed=0)
    inputs.update(guidance_scale=np.float32(3.0))
    noise_pred, eps = _session_outputs(base_bytes, inputs)
    for weight in (0.0, 1.5):
        fused = _run(str(path), inputs | {"adapter_weight": np.float32(weight)})
        side_inputs = inputs | {"adapter_weight": np.float32(weight), side.graph.input[-1].name: eps}
        assert np.allclose(_run(side_bytes, side_inputs), fused, atol=1e-5, rtol=1e-5)
        assert weight or np.array_equal(noise_pred, fused)
    assert eps.shape == (6, *noise_pred.shape[1:])  # both CFG branches' rows
    assert cpu_model_parts(exported["out"] / "text_encoder.onnx",
                           ExportSpec.from_json(manifest["text_encoder"]["spec"])) is None


def _session_outputs(source, inputs) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: np.asarray(v) for k, v in inputs.items() if k in names})


def test_manifest_hashes_match_files(exported):
    out, manifest = exported["out"], exported["manifest"]
    files = manifest["files"]
    assert {"denoiser.onnx", "text_encoder.onnx", "vae_decoder.onnx"} <= set(files)
    assert any(f.startswith("tokenizer/") for f in files) and "scheduler/scheduler_config.json" in files
    for rel, digest in files.items():
        assert artifacts.sha256_file(out / rel) == digest
    assert manifest["opset"] == 18 and manifest["precision"] == "fp32" and manifest["cfg"] is True
    assert manifest["base_fingerprint"] == exported["model"].fingerprint
    assert manifest["adapter"]["base_fingerprint"] == exported["model"].fingerprint
    assert manifest["adapter"]["from_t"] == 600  # the steps it acts at travel with the export (step_weight)
    assert manifest["components"]["denoiser"]["spec"]["max_batch"] == 8
    assert manifest["components"]["text_encoder"]["spec"]["max_batch"] == 16  # cond + uncond prompts
    assert "onnx" in manifest["versions"] and manifest["scheduler_config"]["num_train_timesteps"] == 1000


def test_refit_map_names_initializers_holding_the_adapter_weights(exported):
    from safetensors.torch import load_file

    from invdiff_rt.export.tensorrt import verify_refit_map

    state = load_file(str(exported["adapter_dir"] / "adapter.safetensors"))
    mapping = exported["manifest"]["refit_map"]
    assert set(mapping) == set(state) and len(set(mapping.values())) == len(mapping)
    verify_refit_map(exported["out"] / "denoiser.onnx", state, mapping)  # raises on a folded/renamed weight


def test_read_manifest_refuses_an_edited_file(exported, tmp_path):
    import shutil

    from invdiff_rt.export.manifest import read_manifest

    copy = tmp_path / "copy"
    shutil.copytree(exported["out"], copy)
    read_manifest(copy)
    (copy / "vae_decoder.onnx").write_bytes(b"edited")
    with pytest.raises(InvdiffError, match=r"vae_decoder.onnx: missing or changed since export") as info:
        read_manifest(copy)
    assert "\n" not in str(info.value)


def test_adapter_for_another_base_is_a_one_line_error(exported, tmp_path):
    from invdiff_rt.export.manifest import export_model

    adapter_dir = make_adapter(exported["model"], tmp_path / "adapter", base_fingerprint="f" * 64)
    with pytest.raises(InvdiffError, match=r"adapter.json: trained for base ffffffffffff") as info:
        export_model(exported["model_dir"], tmp_path / "out", adapter_dir)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("kwargs, flag", [({"precision": "int8"}, "--precision int8"), ({"opset": 17}, "--opset 17"),
                                          ({"max_batch": 0}, "--max-batch 0")])
def test_bad_options_are_one_line_errors(exported, tmp_path, kwargs, flag):
    from invdiff_rt.export.manifest import export_model

    with pytest.raises(InvdiffError, match=flag):
        export_model(exported["model_dir"], tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_fp16_denoiser_keeps_cfg_combine_in_fp32(exported, tmp_path):
    import onnx
    from onnx import TensorProto

    from invdiff_rt.export.manifest import export_model

    out = export_model(exported["model_dir"], tmp_path / "fp16", exported["adapter_dir"], precision="fp16",
                       max_batch=4, components=("denoiser",))
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(out / "denoiser.onnx"))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    producers = {o: n for n in graph.node for o in n.output}
    producer = producers["noise_pred"]
    assert producer.op_type == "Cast" and producer.attribute[0].i == TensorProto.FLOAT16  # combined in fp32
    combine = producers[producer.input[0]]  # uncond + s * (cond - uncond)
    assert combine.op_type == "Add" and all(types[i] == TensorProto.FLOAT for i in combine.input)

    def read_as_is_or_cast(name: str) -> set[str]:
        return {name} | {n.output[0] for n in graph.node if n.op_type == "Cast" and n.input[0] == name}

    scaled = next(producers[i] for i in combine.input if producers[i].op_type == "Mul")
    assert read_as_is_or_cast("guidance_scale") & set(scaled.input)
    assert all(types[i] == TensorProto.FLOAT for i in scaled.input)  # the scale and the difference in fp32
    weight = read_as_is_or_cast("adapter_weight")
    shift = next(n for n in graph.node if n.op_type == "Mul" and weight & set(n.input))
    assert all(types[i] == TensorProto.FLOAT for i in shift.input)  # w * delta in fp32 too
    assert {vi.name: vi.type.tensor_type.elem_type for vi in graph.input}["sample"] == TensorProto.FLOAT16
    weights = [i for i in graph.initializer if i.name.startswith("adapter.")]
    assert weights and all(i.data_type == TensorProto.FLOAT16 for i in weights)
    _fp16_matches_fp32_torch_if_ort_cpu_runs_it(exported, out)


def test_fp16_text_encoder_keeps_the_causal_mask(exported, tmp_path):
    """transformers 5 gives CLIP's attention `is_causal=True` and no mask: the fp32-island attention dropped it, so
    every fp16 export's text embeddings were off by rel-L2 0.5-1 (every token read every other one)."""
    import copy

    import onnxruntime as ort

    from invdiff_rt.export.fp16 import keep_fragile_ops_fp32
    from invdiff_rt.export.manifest import export_model

    model = exported["model"]
    ids = model.tokenize(["a photo of the digit 3", "a photo of the digit 7"])
    with torch.no_grad():
        ref = model.text_encoder(ids)[0].numpy()
        islands = keep_fragile_ops_fp32(copy.deepcopy(model.text_encoder), torch.float32)(ids)[0].numpy()
    assert np.linalg.norm(islands - ref) / np.linalg.norm(ref) <= 1e-5
    out = export_model(exported["model_dir"], tmp_path / "fp16", exported["adapter_dir"], precision="fp16",
                       max_batch=4, components=("text_encoder",))
    session = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy().astype(np.int64)})[0].astype(np.float64)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 1e-2


def _fp16_matches_fp32_torch_if_ort_cpu_runs_it(exported, out):
    import onnxruntime as ort

    from invdiff_rt.export.gate import cpu_model_source
    from invdiff_rt.export.manifest import component_spec, read_manifest
    from invdiff_rt.runtime.fused import FusedDenoiser

    spec = component_spec(read_manifest(out), "denoiser")
    inputs = spec.sample_inputs(3, seed=3)
    source = cpu_model_source(out / "denoiser.onnx", spec)
    assert isinstance(source, bytes)  # the adapter-gated graph, as the onnxruntime backend loads it
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        ref = FusedDenoiser(exported["model"].unet, exported["adapter"])(
            **{k: v.float() for k, v in inputs.items()}).numpy()
    rel = np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref)
    assert got.dtype == np.float16 and rel <= 2e-2, rel


def test_export_modules_match_the_fused_step(exported):
    """The wrappers that get exported: weights fed as inputs == own weights; no-CFG variant == cfg=False step."""
    from invdiff_rt.export.onnx_export import adapter_weights, component_module
    from invdiff_rt.export.spec import component_specs
    from invdiff_rt.runtime.fused import FusedDenoiser

    model, adapter = exported["model"], exported["adapter"]
    for cfg in (True, False):
        module = component_module("denoiser", model, adapter, cfg=cfg)
        inputs = component_specs(model, cfg=cfg)["denoiser"].sample_inputs(2, seed=5)
        with torch.no_grad():
            plain = module(**inputs)
            fed = module(**inputs, adapter_params=adapter_weights(module))
            scale = torch.tensor(1.0)
            ref = FusedDenoiser(model.unet, adapter, cfg=cfg)(
                inputs["sample"], inputs["timestep"], inputs["text_embeddings"],
                inputs.get("guidance_scale", scale), inputs["adapter_weight"])
        assert torch.equal(plain, fed) and torch.allclose(plain, ref, atol=1e-6)
