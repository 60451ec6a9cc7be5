"""TensorRT engines: strongly typed build through Polygraphy, a content-addressed engine cache, adapter refit.

Cache layout (`engines/`): `<key>.plan` + `<key>.json` sidecar. The key hashes everything that makes a plan valid:
ONNX bytes, optimisation profile, TensorRT version, GPU name + compute capability, refit mode (+ refittable
names) and builder optimisation level. The sidecar is written last: a plan without a matching sidecar, a sidecar
that disagrees with the expected ingredients, or a plan whose sha256 differs from the sidecar's is stale and is
rebuilt, never loaded.

TensorRT 11 is strongly typed only: an FP16 engine comes from an FP16 ONNX graph. There is no FP16 builder flag.

Refit. Only the adapter's initializers are refittable (`BuilderFlag.REFIT_INDIVIDUAL` + `mark_weights_refittable`),
so the frozen UNet keeps every fusion. We do not use `BuilderFlag.REFIT` (all weights): TensorRT 11.3 lists a known
issue where kREFIT can drop a GEMM bias (wrong output even without a refit); NVIDIA's documented alternative,
kREFIT_IDENTICAL, only allows refitting with the build-time weights (weight-stripped plans), not an adapter swap.
A refit always sets EVERY adapter weight, never only the changed ones (NVIDIA/TensorRT#3628: A->B->A blends).

Export folder contract (`export/NAME/manifest.json`, written by `invdiff export`), the keys read here:
    components.<name>.file      "denoiser.onnx" | "text_encoder.onnx" | "vae_decoder.onnx"
    components.<name>.sha256    sha256 of that file (or files.<file>: sha256)
    components.<name>.spec      ExportSpec.to_json() (profile and shapes come only from the spec)
    refit_map                   adapter state_dict name -> denoiser ONNX initializer name
    adapter.config, adapter.base_fingerprint   the exported adapter (a refit must match both)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .. import artifacts
from ..errors import InvdiffError
from .manifest import COMPONENTS
REFIT_MODES = ("individual", "none")
KEY_LENGTH = 32
BACKEND_USER = "the tensorrt backend (--backend/--backends tensorrt)"  # generate, eval, check and bench load it


def require_tensorrt(who: str):
    """Import TensorRT or raise the one-line install hint, naming `who` needs it ("invdiff build", ...)."""
    try:
        import tensorrt as trt
    except ImportError as e:  # PyPI's wheel stubs and missing libs both end up here
        raise InvdiffError(
            f"{who}: TensorRT is not installed; install the [trt] extra on a machine with an NVIDIA GPU "
            "(pip install 'invdiff-rt[trt]')"
        ) from e
    return trt


PLACEHOLDER_TRT, PLACEHOLDER_GPU = "<tensorrt version>", {"name": "<gpu name>", "compute_capability": "<cc>"}


def _installed_tensorrt() -> str | None:
    try:
        return require_tensorrt("invdiff build --plan").__version__
    except InvdiffError:
        return None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu_identity() -> dict[str, str]:
    """Name and compute capability of CUDA device 0 (engines are only valid on the GPU family they were built on)."""
    import torch

    if not torch.cuda.is_available():
        raise InvdiffError("invdiff build: no CUDA GPU visible; build TensorRT engines on the GPU that will run them")
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "compute_capability": f"{props.major}.{props.minor}"}


# ---------------------------------------------------------------------------------------------------------------
# cache keys and sidecars (pure: tested without TensorRT)


def onnx_sha256(onnx_path: str | Path, file_sha256: str | None = None) -> str:
    """Hash of the ONNX file plus any external-data files it references (sorted by name); `file_sha256`: the
    file's own hash when the caller has it (a multi-GB graph is then read once)."""
    import onnx

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    locations = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
    own = file_sha256 or artifacts.sha256_file(onnx_path)
    parts = [own] + [artifacts.sha256_file(onnx_path.parent / loc) for loc in locations]
    return parts[0] if len(parts) == 1 else artifacts.sha256_json(parts)


def key_ingredients(
    onnx_hash: str,
    profile: Mapping[str, tuple],
    trt_version: str,
    gpu: Mapping[str, str],
    refit_mode: str = "none",
    refit_weights: tuple[str, ...] = (),
    builder_optimization_level: int = 3,
) -> dict[str, Any]:
    """Everything that decides whether a plan is valid: change any of it and the key changes."""
    if refit_mode not in REFIT_MODES:
        raise InvdiffError(f"--refit: unknown mode {refit_mode!r}; use one of {', '.join(REFIT_MODES)}")
    return {
        "onnx_sha256": onnx_hash,
        "profile": {name: [list(map(int, s)) for s in shapes] for name, shapes in sorted(profile.items())},
        "tensorrt": str(trt_version),
        "gpu": {"name": gpu["name"], "compute_capability": gpu["compute_capability"]},
        "refit": refit_mode,
        "refit_weights": sorted(refit_weights) if refit_mode != "none" else [],
        "builder_optimization_level": int(builder_optimization_level),
        "strongly_typed": True,
    }


def cache_key(ingredients: Mapping[str, Any]) -> str:
    return artifacts.sha256_json(dict(ingredients))[:KEY_LENGTH]


def plan_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"{key}.plan"


def sidecar_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"{key}.json"


def stale_reason(cache_dir: str | Path, ingredients: Mapping[str, Any]) -> str | None:
    """None when `<key>.plan` may be loaded, else why it must be (re)built."""
    key = cache_key(ingredients)
    plan, side = plan_path(cache_dir, key), sidecar_path(cache_dir, key)
    if not plan.exists():
        return "no engine"
    if not side.exists():
        return "no sidecar"
    try:
        sidecar = artifacts.read_json(side, "engine sidecar")
    except InvdiffError:
        return "unreadable sidecar"
    if sidecar.get("key") != key or sidecar.get("ingredients") != _jsonable(ingredients):
        return "sidecar does not match (foreign or stale engine)"
    if artifacts.sha256_file(plan) != sidecar.get("plan_sha256"):
        return "engine file hash differs from its sidecar (corrupted)"
    return None


def write_sidecar(cache_dir: str | Path, ingredients: Mapping[str, Any], extra: Mapping[str, Any]) -> Path:
    """Commit a plan already in place: the sidecar is the last thing written."""
    key = cache_key(ingredients)
    plan = plan_path(cache_dir, key)
    record = {
        "key": key,
        "ingredients": _jsonable(ingredients),
        "plan_sha256": artifacts.sha256_file(plan),
        "plan_bytes": plan.stat().st_size,
        "versions": artifacts.package_versions(),
        **extra,
    }
    return artifacts.atomic_write_json(sidecar_path(cache_dir, key), record)


def read_sidecar_for(plan: str | Path) -> dict[str, Any]:
    """The sidecar of a plan file, verified (key, file hash); raises a one-line error when it is stale."""
    plan = Path(plan)
    if not plan.exists():
        raise InvdiffError(f"--engine {plan}: engine not found; run `invdiff build` first")
    sidecar = artifacts.read_json(plan.with_suffix(".json"), "engine sidecar")
    reason = stale_reason(plan.parent, sidecar.get("ingredients", {}))
    if sidecar.get("key") != plan.stem or reason is not None:
        raise InvdiffError(f"--engine {plan}: {reason or 'file name is not its cache key'}; rebuild with `invdiff build`")
    return sidecar


def _jsonable(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, sort_keys=True, default=str))


# ---------------------------------------------------------------------------------------------------------------
# build (needs TensorRT + GPU)


@dataclass(frozen=True)
class BuildOptions:
    timing_cache: Path | None = None
    builder_optimization_level: int = 3
    workspace_gb: float | None = None
    refit_mode: str = "individual"


def default_timing_cache(out_dir: Path, gpu: Mapping[str, str], trt_version: str) -> Path:
    """One timing cache per GPU model and TensorRT version (a foreign cache silently gives slower engines)."""
    slug = "".join(c if c.isalnum() else "-" for c in gpu["name"]).strip("-").lower()
    return out_dir / f"timing-{slug}-sm{gpu['compute_capability'].replace('.', '')}-trt{trt_version}.cache"


def _network(onnx_path: Path, refit_weights: tuple[str, ...], trt):
    from polygraphy.backend.trt import PostprocessNetwork, network_from_onnx_path

    network = network_from_onnx_path(
        str(onnx_path), strongly_typed=True, flags=[trt.OnnxParserFlag.NATIVE_INSTANCENORM]
    )
    if not refit_weights:
        return network

    def mark_adapter_refittable(network):
        for name in refit_weights:
            if not network.mark_weights_refittable(name):
                raise InvdiffError(f"{onnx_path}: no weights named {name!r} to mark refittable; re-export the model")

    return PostprocessNetwork(network, mark_adapter_refittable, name="mark_adapter_refittable")


def _config(profile: Mapping[str, tuple], options: BuildOptions, timing_cache: Path, refit: bool, trt):
    from polygraphy.backend.trt import CreateConfig, PostprocessConfig, Profile

    trt_profile = Profile()
    for name, (lo, opt, hi) in profile.items():
        trt_profile.add(name, min=tuple(lo), opt=tuple(opt), max=tuple(hi))
    pools = None
    if options.workspace_gb:
        pools = {trt.MemoryPoolType.WORKSPACE: int(options.workspace_gb * (1 << 30))}
    config = CreateConfig(
        profiles=[trt_profile],
        load_timing_cache=str(timing_cache) if timing_cache.exists() else None,
        builder_optimization_level=options.builder_optimization_level,
        memory_pool_limits=pools,
    )
    if not refit:
        return config

    def set_refit_individual(builder, network, config):
        config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)

    return PostprocessConfig(config, set_refit_individual)


def build_engine(
    onnx_path: str | Path,
    profile: Mapping[str, tuple],
    cache_dir: str | Path,
    options: BuildOptions,
    refit_weights: tuple[str, ...] = (),
    component: str = "",
) -> Path:
    """Return the cached plan for this ONNX + profile + GPU, building it (atomically) when missing or stale."""
    return _build_or_reuse(Path(onnx_path), profile, Path(cache_dir), options, refit_weights, component)[0]


def _build_or_reuse(onnx_path: Path, profile, cache_dir: Path, options: BuildOptions,
                    refit_weights: tuple[str, ...], component: str) -> tuple[Path, bool]:
    trt = require_tensorrt("invdiff build")
    from polygraphy.backend.trt import engine_from_network, save_engine

    gpu = gpu_identity()
    refit_weights = tuple(refit_weights) if options.refit_mode != "none" else ()
    ingredients = key_ingredients(onnx_sha256(onnx_path), profile, trt.__version__, gpu, options.refit_mode,
                                  refit_weights, options.builder_optimization_level)
    plan = plan_path(cache_dir, cache_key(ingredients))
    if stale_reason(cache_dir, ingredients) is None:
        return plan, True
    timing_cache = Path(options.timing_cache or default_timing_cache(cache_dir, gpu, trt.__version__))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    network = _network(onnx_path, refit_weights, trt)
    config = _config(profile, options, timing_cache, bool(refit_weights), trt)
    start = time.perf_counter()
    engine = engine_from_network(network, config, save_timing_cache=str(timing_cache))
    seconds = time.perf_counter() - start
    with artifacts.atomic_path(plan) as tmp:
        save_engine(engine, path=str(tmp))
    write_sidecar(cache_dir, ingredients, {"component": component, "onnx": str(Path(onnx_path).resolve()),
                                           "build_seconds": seconds,
                                           "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                           "timing_cache": str(timing_cache)})
    return plan, False


def load_engine(plan: str | Path):
    """Deserialize a verified plan (sidecar checked first: a stale plan is never handed to TensorRT)."""
    require_tensorrt(BACKEND_USER)
    from polygraphy.backend.trt import engine_from_bytes
    from polygraphy.backend.common import bytes_from_path

    read_sidecar_for(plan)
    return engine_from_bytes(bytes_from_path(str(plan)))


# ---------------------------------------------------------------------------------------------------------------
# refit


def initializer_specs(onnx_path: str | Path, names: list[str]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of the named initializers (external data is not loaded)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    found = {
        init.name: (tuple(init.dims), np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)))
        for init in model.graph.initializer
        if init.name in set(names)
    }
    missing = [n for n in names if n not in found]
    if missing:
        raise InvdiffError(f"{onnx_path}: refit initializers {missing[:3]} are not in the graph; re-export the model")
    return found


def refit_arrays(
    state_dict: Mapping[str, Any],
    refit_map: Mapping[str, str],
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
) -> dict[str, np.ndarray]:
    """initializer name -> contiguous array for EVERY adapter tensor (never only the changed ones, TRT #3628)."""
    extra = sorted(set(state_dict) - set(refit_map))
    absent = sorted(set(refit_map) - set(state_dict))
    if extra or absent:
        raise InvdiffError(
            f"--adapter: tensors {(extra or absent)[:3]} do not match the exported adapter; "
            "refit needs the same adapter architecture (re-export for a new architecture)"
        )
    if len(set(refit_map.values())) != len(refit_map):
        raise InvdiffError("manifest.json: two adapter tensors map to one initializer; re-export the model")
    out = {}
    for name, init in refit_map.items():
        array = _to_numpy(state_dict[name])
        shape, dtype = specs[init]
        if tuple(array.shape) != tuple(shape):
            raise InvdiffError(f"--adapter: {name} has shape {tuple(array.shape)}, the engine expects {shape}; "
                               "use an adapter with the exported architecture")
        out[init] = np.ascontiguousarray(array.astype(dtype))
    return out


def _to_numpy(tensor) -> np.ndarray:
    if isinstance(tensor, np.ndarray):
        return tensor
    return tensor.detach().float().cpu().numpy()


def refit_plan(plan: str | Path, arrays: Mapping[str, np.ndarray], out_plan: str | Path) -> Path:
    """Refit every given weight of `plan` and save the result to `out_plan` atomically."""
    trt = require_tensorrt("invdiff refit")
    from polygraphy.backend.trt import bytes_from_engine, engine_from_bytes, util as trt_util
    from polygraphy.backend.common import bytes_from_path

    engine = engine_from_bytes(bytes_from_path(str(plan)))
    refitter = trt.Refitter(engine, trt_util.get_trt_logger())
    refittable = set(refitter.get_all_weights())
    unknown = sorted(set(arrays) - refittable)
    if unknown:
        raise InvdiffError(f"--engine {plan}: weights {unknown[:3]} are not refittable; rebuild with --refit individual")
    for name, array in arrays.items():  # arrays stay alive until refit_cuda_engine()
        if not refitter.set_named_weights(name, trt.Weights(array)):
            raise InvdiffError(f"--engine {plan}: TensorRT rejected new weights for {name}; rebuild the engine")
    missing = refitter.get_missing_weights()
    if missing:
        raise InvdiffError(f"--engine {plan}: refit still misses weights {list(missing)[:3]}; rebuild the engine")
    if not refitter.refit_cuda_engine():
        raise InvdiffError(f"--engine {plan}: TensorRT refit failed; rebuild the engine with `invdiff build`")
    return artifacts.atomic_write_bytes(out_plan, bytes(bytes_from_engine(engine)))


def refit_ingredients(base: Mapping[str, Any], adapter_fingerprint: str) -> dict[str, Any]:
    """The refitted plan is a new cache entry: the base ingredients plus the adapter it now carries."""
    return {**_jsonable(base), "adapter_sha256": adapter_fingerprint}


# ---------------------------------------------------------------------------------------------------------------
# export folders (manifest.json written by `invdiff export`)

MANIFEST_NAME = artifacts.FOLDER_MARKERS["export"]  # the export folder it reads


@dataclass(frozen=True)
class ExportedComponent:
    name: str
    onnx: Path
    sha256: str | None
    profile: dict[str, tuple]


def read_export_manifest(export_dir: str | Path) -> dict[str, Any]:
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise InvdiffError(f"--onnx {export_dir}: not an export folder; run `invdiff export` first")
    from .manifest import read_manifest

    return read_manifest(export_dir, verify=False, flag="--onnx")  # ONNX files are checked one by one (`verify_onnx`)


def export_components(export_dir: str | Path, names: list[str] | None = None) -> list[ExportedComponent]:
    """The exported components with their ONNX file, recorded hash and TensorRT optimisation profile."""
    export_dir = Path(export_dir)
    manifest = read_export_manifest(export_dir)
    entries = manifest.get("components") or {}
    unknown = sorted(set(names or ()) - set(entries))
    if unknown:
        raise InvdiffError(f"--component: {unknown[0]!r} is not in {export_dir / MANIFEST_NAME}; "
                           f"choose from {', '.join(sorted(entries))}")
    out = []
    for name in [n for n in COMPONENTS if n in entries] + sorted(set(entries) - set(COMPONENTS)):
        if names and name not in names:
            continue
        entry = entries[name]
        file = entry.get("file", f"{name}.onnx")
        recorded = entry.get("sha256") or (manifest.get("files") or {}).get(file)
        out.append(ExportedComponent(name, export_dir / file, recorded if isinstance(recorded, str) else None,
                                     component_profile(entry)))
    if not out:
        raise InvdiffError(f"{export_dir / MANIFEST_NAME}: lists no components; re-run `invdiff export`")
    return out


def component_profile(entry: Mapping[str, Any]) -> dict[str, tuple]:
    """{input name: (min, opt, max)} from the component's export spec (shapes are declared only there)."""
    if "profile" in entry:
        return {k: tuple(tuple(int(d) for d in s) for s in v) for k, v in entry["profile"].items()}
    from .spec import ExportSpec

    return {k: tuple(tuple(int(d) for d in s) for s in v) for k, v in ExportSpec.from_json(entry["spec"]).profile().items()}


def verify_onnx(component: ExportedComponent) -> str:
    """sha256 of the component's ONNX; refuses a file edited after the manifest was written."""
    if not component.onnx.exists():
        raise InvdiffError(f"{component.onnx}: listed in {MANIFEST_NAME} but missing; re-run `invdiff export`")
    own = artifacts.sha256_file(component.onnx)
    if component.sha256 and own != component.sha256:
        raise InvdiffError(f"{component.onnx}: content differs from {MANIFEST_NAME} (edited after export); "
                           "re-run `invdiff export`")
    return onnx_sha256(component.onnx, own)


def refit_map(manifest: Mapping[str, Any]) -> dict[str, str]:
    """Adapter state_dict name -> ONNX initializer name of the denoiser (empty when exported without adapter)."""
    return dict(manifest.get("refit_map") or {})


def component_ingredients(export_dir: str | Path, trt_version: str, gpu: Mapping[str, str], refit_mode: str,
                          builder_optimization_level: int, components: list[str] | None = None):
    """Yield (component, engine key ingredients) for every exported component; only the denoiser carries the
    adapter's refit weights."""
    weights = tuple(sorted(refit_map(read_export_manifest(export_dir)).values()))
    for component in export_components(export_dir, components):
        yield component, _variant_ingredients(component, verify_onnx(component), weights, trt_version, gpu,
                                              [(refit_mode, builder_optimization_level)])[0]


def build_plan(export_dir: str | Path, options: BuildOptions, components: list[str] | None = None,
               trt_version: str | None = None, gpu: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """What `build_export` would build, without TensorRT or a GPU: per component its optimisation profile (min /
    opt / max shapes, batch and resolution) and engine cache key. The key holds the TensorRT version and GPU: this
    machine's where it has them (the key of the plan `invdiff build` writes here), else the given or placeholders."""
    trt_version = trt_version or _installed_tensorrt() or PLACEHOLDER_TRT
    gpu = gpu or (gpu_identity() if _has_cuda() else PLACEHOLDER_GPU)
    return [{"component": component.name, "profile": ingredients["profile"], "key": cache_key(ingredients),
             "tensorrt": trt_version, "gpu": gpu}
            for component, ingredients in component_ingredients(export_dir, trt_version, gpu, options.refit_mode,
                                                                options.builder_optimization_level, components)]


OPTIMIZATION_LEVELS = tuple(range(6))  # TensorRT's builder optimisation levels


def build_variants(refit_mode: str, builder_optimization_level: int, refit: bool) -> list[tuple[str, int]]:
    """(refit mode, optimisation level) of the plans to look for, the asked-for pair first: `invdiff build` may
    have used any of them (`--refit none`, `--builder-optimization-level 5`); a refit needs refittable weights."""
    modes = [m for m in dict.fromkeys((refit_mode, *REFIT_MODES)) if not (refit and m == "none")]
    levels = dict.fromkeys((builder_optimization_level, *OPTIMIZATION_LEVELS))
    return [(mode, level) for mode in modes for level in levels]


def _variant_ingredients(component: ExportedComponent, onnx_hash: str, weights: tuple, trt_version: str,
                         gpu: Mapping[str, str], variants: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """The component's key ingredients under each build variant (only the denoiser carries refit weights)."""
    own = weights if component.name == "denoiser" else ()
    return [key_ingredients(onnx_hash, component.profile, trt_version, gpu, mode, own if mode != "none" else (),
                            level) for mode, level in variants]


def _first_current(engines_dir: str | Path, candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((c for c in candidates if stale_reason(engines_dir, c) is None), None)


def engine_plans(export_dir: str | Path, engines_dir: str | Path, trt_version: str, gpu: Mapping[str, str],
                 refit_mode: str = "individual", builder_optimization_level: int = 3,
                 adapter_dir: str | Path | None = None) -> dict[str, Path]:
    """The cached plan of every exported component, built with the given options or, failing that, any other
    refit mode / optimisation level `invdiff build` takes; the denoiser's refitted with `adapter_dir` (by `invdiff
    refit`) when one is given and it is not the exported adapter. A missing or stale plan is a one-line error that
    names the command making it."""
    refit_fp = refit_fingerprint(export_dir, adapter_dir, refit_mode) if adapter_dir is not None else None
    weights = tuple(sorted(refit_map(read_export_manifest(export_dir)).values()))
    plans = {}
    for component in export_components(export_dir):
        refit = component.name == "denoiser" and refit_fp is not None
        variants = build_variants(refit_mode, builder_optimization_level, refit)
        candidates = _variant_ingredients(component, verify_onnx(component), weights, trt_version, gpu, variants)
        wanted = [refit_ingredients(c, refit_fp) for c in candidates] if refit else candidates
        built = _first_current(engines_dir, wanted)
        if built is None:
            raise InvdiffError(f"{engines_dir}: {component.name} engine: {stale_reason(engines_dir, wanted[0])}; "
                               f"{_missing_fix(export_dir, engines_dir, candidates, adapter_dir if refit else None)}")
        plans[component.name] = plan_path(engines_dir, cache_key(built))
    return plans


def _missing_fix(export_dir, engines_dir, candidates: list[dict[str, Any]], refit_adapter) -> str:
    """The command that makes a missing plan: `invdiff build`, or `invdiff refit` of the built engine."""
    if refit_adapter is None:
        return f"run `invdiff build --onnx {export_dir} --out {engines_dir}`"
    base = _first_current(engines_dir, candidates)
    return (f"run `invdiff refit --engine {plan_path(engines_dir, cache_key(base or candidates[0]))} --adapter "
            f"{refit_adapter}`" + ("" if base else " (after `invdiff build`)"))


def refit_fingerprint(export_dir: str | Path, adapter_dir: str | Path, refit_mode: str) -> str | None:
    """The fingerprint of an adapter that can be refitted into this export's denoiser engine (checked first);
    None for the exported adapter itself (the built engine already carries it)."""
    from ..method.adapter import adapter_fingerprint, read_adapter_manifest

    manifest, fingerprint = read_export_manifest(export_dir), adapter_fingerprint(adapter_dir)
    if fingerprint == (manifest.get("adapter") or {}).get("fingerprint"):
        return None
    if refit_mode == "none":
        raise InvdiffError(f"--adapter {adapter_dir}: the engines are built without refittable weights; build "
                           "them with --refit individual, then `invdiff refit`")
    check_adapter_compatible(manifest, read_adapter_manifest(adapter_dir), adapter_dir)
    return fingerprint


def refitted_manifest(manifest: Mapping[str, Any], adapter_dir: str | Path) -> dict[str, Any]:
    """The export manifest as the runtime reads it once `adapter_dir` is refitted in: that adapter's from_t."""
    from ..method.adapter import read_adapter_manifest

    adapter = read_adapter_manifest(adapter_dir)
    return {**manifest, "adapter": {**(manifest.get("adapter") or {}), "from_t": adapter.get("from_t")}}


def build_export(export_dir: str | Path, out_dir: str | Path, options: BuildOptions,
                 components: list[str] | None = None):
    """Yield (component, plan path, reused) for every exported component; only the denoiser carries refit weights."""
    adapter_weights = tuple(sorted(refit_map(read_export_manifest(export_dir)).values()))
    for component in export_components(export_dir, components):
        verify_onnx(component)
        weights = adapter_weights if component.name == "denoiser" else ()
        plan, reused = _build_or_reuse(component.onnx, component.profile, Path(out_dir), options, weights,
                                       component.name)
        yield component.name, plan, reused


def check_adapter_compatible(manifest: Mapping[str, Any], adapter_manifest: Mapping[str, Any], adapter_dir) -> None:
    """A refit keeps the engine's graph: the new adapter needs the exported architecture and the same base model."""
    exported = manifest.get("adapter") or {}
    if not exported or not refit_map(manifest):
        raise InvdiffError(f"--adapter {adapter_dir}: the engine's export has no adapter to refit; export with "
                           "--adapter and rebuild")
    if adapter_manifest.get("config") != exported.get("config"):
        raise InvdiffError(f"--adapter {adapter_dir}: architecture {adapter_manifest.get('config')} differs from the "
                           "exported adapter's; re-export and rebuild for a new architecture")
    base = exported.get("base_fingerprint", manifest.get("base_fingerprint"))
    if adapter_manifest.get("base_fingerprint") != base:
        raise InvdiffError(f"--adapter {adapter_dir}: trained for base {str(adapter_manifest.get('base_fingerprint'))[:12]}"
                           f", the engine's base is {str(base)[:12]}; use an adapter trained on this base")


def load_adapter_tensors(adapter_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(adapter manifest, state_dict, fingerprint), with the weights' hash checked against the manifest."""
    from safetensors.numpy import load_file

    from ..method.adapter import WEIGHTS_NAME, adapter_fingerprint, read_adapter_manifest

    adapter_dir = Path(adapter_dir)
    adapter_manifest = read_adapter_manifest(adapter_dir)
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.exists() or artifacts.sha256_file(weights) != adapter_manifest.get("weights_sha256"):
        raise InvdiffError(f"--adapter {weights}: missing or does not match its adapter.json; retrain the adapter")
    return adapter_manifest, load_file(str(weights)), adapter_fingerprint(adapter_dir)


def refit_export_engine(engine: str | Path, adapter_dir: str | Path, export_dir: str | Path | None = None,
                        out_dir: str | Path | None = None) -> Path:
    """Refit the denoiser engine with every weight of a new adapter; the result is a new, verified cache entry."""
    engine = Path(engine)
    sidecar = read_sidecar_for(engine)
    base = sidecar["ingredients"]
    if base.get("refit") == "none" or not base.get("refit_weights"):
        raise InvdiffError(f"--engine {engine}: built without refittable adapter weights; rebuild with --refit individual")
    export_dir = Path(export_dir) if export_dir else Path(sidecar["onnx"]).parent
    manifest = read_export_manifest(export_dir)
    (denoiser,) = export_components(export_dir, ["denoiser"])
    if verify_onnx(denoiser) != base["onnx_sha256"]:
        raise InvdiffError(f"--onnx {export_dir}: not the export this engine was built from; pass the right --onnx")
    adapter_manifest, state, fingerprint = load_adapter_tensors(adapter_dir)
    check_adapter_compatible(manifest, adapter_manifest, adapter_dir)
    mapping = refit_map(manifest)
    arrays = refit_arrays(state, mapping, initializer_specs(denoiser.onnx, list(mapping.values())))
    return refit_into_cache(engine, arrays, fingerprint, Path(out_dir) if out_dir else engine.parent,
                            {"onnx": str(Path(denoiser.onnx).resolve()), "adapter": str(Path(adapter_dir).resolve())})


def refit_into_cache(engine: str | Path, arrays: Mapping[str, np.ndarray], adapter_fingerprint: str,
                     out_dir: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Refit a cached plan; the result is its own cache entry (base ingredients + adapter), with a sidecar."""
    engine = Path(engine)
    base = {k: v for k, v in read_sidecar_for(engine)["ingredients"].items() if k != "adapter_sha256"}
    ingredients = refit_ingredients(base, adapter_fingerprint)
    plan = plan_path(out_dir, cache_key(ingredients))
    if stale_reason(out_dir, ingredients) is None:
        return plan
    start = time.perf_counter()
    refit_plan(engine, arrays, plan)
    write_sidecar(out_dir, ingredients, {"component": "denoiser", "refit_from": engine.stem, **(extra or {}),
                                         "refit_seconds": time.perf_counter() - start,
                                         "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return plan


def verify_refit_map(onnx_path: str | Path, state_dict: Mapping[str, Any], mapping: Mapping[str, str]) -> None:
    """Every adapter tensor maps to exactly one initializer holding the same values (after the graph's dtype cast)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    inits = {init.name: init for init in model.graph.initializer}
    targets = list(mapping.values())
    duplicated = sorted({t for t in targets if targets.count(t) > 1})
    if duplicated or set(mapping) != set(state_dict):
        raise InvdiffError(f"{onnx_path}: refit map is not one-to-one with the adapter "
                           f"({duplicated[:2] or sorted(set(mapping) ^ set(state_dict))[:2]}); re-export the model")
    for name, init_name in mapping.items():
        if init_name not in inits:
            raise InvdiffError(f"{onnx_path}: initializer {init_name!r} for {name} is missing; re-export the model")
        stored = numpy_helper.to_array(inits[init_name])
        expected = _to_numpy(state_dict[name]).astype(stored.dtype)
        if stored.shape != expected.shape or not np.array_equal(stored, expected):
            raise InvdiffError(f"{onnx_path}: initializer {init_name!r} does not hold {name}'s values "
                               "(folded or transposed at export); re-export with adapter weights kept as initializers")
