"""The CLI boundary: every option of every command is checked before the command loads or writes anything.

One table (`RULES`) holds the constraints of every flag: ranges, choices and what a path must be. The checks read it,
and so does the test that walks the Typer app (`tests/test_cli_walk.py`), so the two cannot drift. A flag with no
entry gets its type's default rule (an int is >= 0, a float finite, a string not blank, a path not below a regular
file). `guard(app)` wraps every registered command: the checks run first, then the advisory lock on each output
(`artifacts.output_lock`), then the command. A failure is an `InvdiffError`: one line, exit 2, nothing created.
"""

from __future__ import annotations

import errno
import functools
import inspect
import math
import os
import typing
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .artifacts import FOLDER_MARKERS, GROUPS_FORMAT, check_replaceable, checkpoint_dir, read_json
from .errors import InvdiffError

INPUT_KINDS = ("dir", "file", "prefix", "model")  # must exist
OUTPUT_KINDS = ("out_dir", "out_file", "out_prefix")  # may exist; are locked while a command writes them
CACHE_KINDS = ("cache",)  # a shared, content-addressed folder (engine cache): checked like out_dir, never locked
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)  # reported by the CLI as one line, exit 1


@dataclass(frozen=True)
class Rule:
    """Constraints of one flag. `above` / `below` are exclusive bounds; `choices` is called lazily (no heavy import
    unless the flag is given); `path` is one of INPUT_KINDS or OUTPUT_KINDS; `comma`: a comma-separated list."""

    min: float | None = None
    max: float | None = None
    above: float | None = None
    below: float | None = None
    choices: Callable[[], Sequence[str]] | None = None
    path: str | None = None
    comma: bool = False
    note: str = ""  # why the bounds, appended to a range error
    marker: str = ""  # out_dir replaced whole by an artifact: only an empty folder or one holding `marker`
    suffixes: tuple[str, ...] = ()  # out_file: the file types the writer can write
    lock: bool = False  # an input the command updates in place: locked like an output


def _schedulers():
    from .runtime.defaults import SCHEDULERS

    return SCHEDULERS


def _backends():
    from .runtime.backends import BACKENDS

    return BACKENDS


def _bench_backends():
    from .bench import BACKENDS

    return BACKENDS


def _backends_auto():
    return ("auto", *_backends())


def _recipes_data():
    from .data.recipes import RECIPES

    return sorted(RECIPES)


def _strip_modes():
    from .eval.classifiers import STRIP_MODES

    return STRIP_MODES


def _refit_modes():
    from .export.tensorrt import REFIT_MODES

    return REFIT_MODES


def _peers():
    from .peers import PEERS

    return sorted(PEERS)


def _variants():
    from .models.sd import VARIANTS

    return sorted(VARIANTS)


def _scores():
    from .method.losses import SCORES

    return SCORES


def _targets():
    from .method.targets import TARGETS

    return TARGETS


def _shares_from():
    from .method.train import SHARES_FROM

    return SHARES_FROM


def _t_sampling():
    from .method.targets import T_SAMPLING

    return T_SAMPLING


def _centres():
    from .method.calibrate import CENTRES

    return CENTRES


def _fixed(*values: str) -> Callable[[], Sequence[str]]:
    return lambda: values


CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
SAMPLING_STEPS = Rule(min=1, max=1000, note="a scheduler samples at most the model's 1000 training timesteps")


def _threads(low: int) -> Rule:
    return Rule(min=low, max=CORES, note="the cores this process may use")


MAX_BATCH = 4096  # images a batch: far past what one GPU holds at SD scale (a typo would hang for hours)
BATCH_NOTE = "one batch is sampled at once; run larger jobs as several batches"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Keys: "--flag" for every command, or "command --flag" (command path joined by spaces) to override it.
RULES: dict[str, Rule] = {
    "--steps": Rule(min=1),
    "generate --steps": SAMPLING_STEPS,
    "eval --steps": SAMPLING_STEPS,
    "bench --steps": SAMPLING_STEPS,
    "check --steps": SAMPLING_STEPS,
    "--vae-steps": Rule(min=1),
    "--seed": Rule(min=0, max=2**32 - 1, note="seeds are 32-bit"),  # seed * 1,000,003 + step stays in int64
    "--num": Rule(min=1, max=1_000_000, note="a run plans every image up front; split larger runs over --out folders"),
    "--per-prompt": Rule(min=1),
    "--calibrate-per-prompt": Rule(min=1),
    "--shares-per-prompt": Rule(min=1),
    "--calibrate-min-samples": Rule(min=0),
    "--min-samples": Rule(min=0),
    "--batch-size": Rule(min=1, max=MAX_BATCH, note=BATCH_NOTE),
    "--threads": _threads(0),
    "generate --threads": _threads(1),
    "bench --threads": _threads(1),
    "--epochs": Rule(min=1),
    "--size": Rule(min=8, max=1024),
    "--n-train": Rule(min=1),
    "--n-test": Rule(min=1),
    "--groups": Rule(min=2),
    "--draws": Rule(min=1, max=64, note="each draw is one more UNet pass over the data"),
    "--pairs": Rule(min=1, max=64, note="each pair is two more UNet passes over the samples"),
    "--grid-samples": Rule(min=1),
    "--checkpoint-every": Rule(min=1),
    "--train-steps": Rule(min=1),
    "--warmup": Rule(min=0),
    "--repeats": Rule(min=1),
    "--opset": Rule(min=18, max=25, note="the opsets the pinned exporter writes a valid graph for"),  # 26 fails
    # the checker (GroupNormalization); 25 runs on ONNX Runtime 1.32 and OpenVINO 2026.4 (checked 2026-12-06)
    "--max-batch": Rule(min=1, max=MAX_BATCH, note=BATCH_NOTE),
    "--bias": Rule(min=0.0, max=1.0),
    "--guidance-scale": Rule(min=0.0, max=100.0, note="classifier-free guidance is used at 1-20; far above, the "
                             "images saturate to flat colour"),
    "--adapter-weight": Rule(min=0.0, max=100.0, note="the label-free weights are about 1; far above, the "
                             "adapter's shift swamps the model's prediction"),
    "--lr": Rule(above=0.0),
    "--ema-decay": Rule(min=0.0, below=1.0, note="the share of the average kept at each step; 1 would keep the "
                        "initial weights"),
    "--lambda": Rule(min=0.0, max=1000.0, note="the recipes use 0 (invdiff-rt) and 1 (paper); far above, the "
                     "variance penalty swamps the denoising loss"),
    "--outlier-k": Rule(above=0.0),
    "--scheduler": Rule(choices=_schedulers),
    "--precision": Rule(choices=_fixed("fp32", "fp16", "bf16")),
    "--backend": Rule(choices=_backends_auto),
    "--backends": Rule(choices=_backends, comma=True),
    "bench --backends": Rule(choices=_bench_backends, comma=True),  # eager included, no CUDA variants
    "--batch-sizes": Rule(min=1, max=MAX_BATCH, comma=True, note=BATCH_NOTE),
    "--peers": Rule(choices=_peers, comma=True),
    "--peers-python": Rule(path="file"),
    "--rounds": Rule(min=1),
    "--height": Rule(min=8),
    "--width": Rule(min=8),
    "--variant": Rule(choices=_variants),
    "groups --recipe": Rule(choices=_fixed("invdiff-rt", "paper", "erm")),  # erm: refused with a hint below
    "train --recipe": Rule(choices=_fixed("invdiff-rt", "paper", "erm")),
    "--score": Rule(choices=_scores),
    "--target": Rule(choices=_targets),
    "--shares-from": Rule(choices=_shares_from),
    "--t-sampling": Rule(choices=_t_sampling),
    "--strip": Rule(choices=_strip_modes),
    "--refit": Rule(choices=_refit_modes),
    "--centre": Rule(choices=_centres),
    "data make RECIPE": Rule(choices=_recipes_data),
    "--model": Rule(path="model"),
    "--data": Rule(path="dir"),
    "--adapter": Rule(path="dir"),
    "--export": Rule(path="dir"),
    "--base-export": Rule(path="dir"),
    "--onnx": Rule(path="dir"),
    "--classifier": Rule(path="dir"),
    "--prompts": Rule(path="file"),
    "--oracle-shares-from": Rule(path="file"),
    "--engine": Rule(path="file"),
    "train --groups": Rule(path="prefix"),
    "calibrate --groups": Rule(path="prefix"),
    "calibrate --adapter": Rule(path="dir", lock=True),  # its adapter.json is rewritten (train --out locks it too)
    "data info ROOT": Rule(path="dir"),
    "--out": Rule(path="out_dir"),
    "train --out": Rule(path="out_dir", marker=FOLDER_MARKERS["adapter"]),  # the artifact folders, replaced whole
    "export --out": Rule(path="out_dir", marker=FOLDER_MARKERS["export"]),
    "pretrain --out": Rule(path="out_dir", marker=FOLDER_MARKERS["model"]),
    "model build-sd --out": Rule(path="out_dir", marker=FOLDER_MARKERS["model"]),
    "data make --out": Rule(path="out_dir", marker=FOLDER_MARKERS["dataset"]),
    "classifier train --out": Rule(path="out_dir", marker=FOLDER_MARKERS["classifiers"]),
    "groups --out": Rule(path="out_prefix"),
    "--engines": Rule(path="cache"),
    "build --out": Rule(path="cache"),
    "refit --out": Rule(path="cache"),
    "--json": Rule(path="out_file"),
    "--plot": Rule(path="out_file", suffixes=(".png",)),  # bench writes a PNG
    "--grid": Rule(path="out_file", suffixes=IMAGE_SUFFIXES),
    "--timing-cache": Rule(path="out_file"),
    "--workspace-gb": Rule(min=0.1, max=1024.0, note="GiB of GPU memory the builder may use; the largest cards hold "
                           "about 192"),
}


# ---------------------------------------------------------------- introspection (shared with the walking test)

@dataclass(frozen=True)
class Param:
    """One option or argument of a command, from the command function's signature."""

    name: str  # the Python parameter name
    flag: str  # "--out", or the argument's metavar ("RECIPE")
    type: type  # int, float, str, bool or Path (Optional[...] and List[...] unwrapped)
    multiple: bool
    required: bool
    argument: bool
    info: Any  # typer's OptionInfo / ArgumentInfo


def commands(app) -> Iterator[tuple[str, Any]]:
    """(command path such as "data make", CommandInfo) for every command of a Typer app, depth first."""
    for info in app.registered_commands:
        yield info.name or info.callback.__name__.replace("_", "-"), info
    for group in app.registered_groups:
        for path, info in commands(group.typer_instance):
            yield f"{group.name} {path}", info


def params(func) -> list[Param]:
    """Both declaration styles: `x: int = typer.Option(...)` and `x: Annotated[int, typer.Option(...)] = 3`."""
    hints = typing.get_type_hints(func, include_extras=True)
    found = [_param(name, hints.get(name, str), p.default) for name, p in inspect.signature(func).parameters.items()]
    return [p for p in found if not p.type.__name__.endswith("Context")]  # typer.Context is no option


def _param(name: str, annotation, default) -> Param:
    info, required = default, getattr(default, "default", None) is ...
    decls = list(getattr(info, "param_decls", None) or ())
    if typing.get_origin(annotation) is typing.Annotated:
        info = next((m for m in annotation.__metadata__ if hasattr(m, "param_decls")), None)
        required = default is inspect.Parameter.empty or default is ...
        first = getattr(info, "default", None)  # Annotated style: typer reads a leading "--flag" as a declaration
        decls = ([first] if isinstance(first, str) and first.startswith("-") else []) + list(getattr(info, "param_decls", None) or ())
        annotation = typing.get_args(annotation)[0]
    base, multiple = _unwrap(annotation)
    decls = [d for d in decls if d.startswith("--")]
    argument = type(info).__name__ == "ArgumentInfo"
    flag = name.upper() if argument else (decls[0].split("/")[0] if decls else "--" + name.replace("_", "-"))
    return Param(name, flag, base, multiple, required, argument, info)


def _unwrap(annotation) -> tuple[type, bool]:
    multiple = False
    while typing.get_origin(annotation) is not None:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        multiple = multiple or typing.get_origin(annotation) in (list, typing.List)
        annotation = args[0]
    return annotation, multiple


def rule_for(command: str, param: Param) -> Rule:
    """The flag's rule: command-specific entry, else the flag's, else the type's default; typer's own min/max kept."""
    rule = RULES.get(f"{command} {param.flag}") or RULES.get(param.flag) or _default_rule(param.type)
    low, high = getattr(param.info, "min", None), getattr(param.info, "max", None)
    if low is not None or high is not None:
        rule = replace(rule, min=rule.min if low is None else low, max=rule.max if high is None else high)
    return rule


def _default_rule(kind: type) -> Rule:
    return Rule(min=0) if kind is int else Rule()


def output_params(command: str, func) -> list[Param]:
    return [p for p in params(func) if p.type is Path and _writes(rule_for(command, p))]


def _writes(rule: Rule) -> bool:
    """An output, or an input the command updates in place: locked while the command runs."""
    return rule.path in OUTPUT_KINDS or rule.lock


# ---------------------------------------------------------------- the checks

def check_argv(argv: Sequence[str]) -> None:
    """Empty values ('--out ""', '--out=') are refused before Typer turns an empty path into the current folder."""
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if arg.startswith("--") and eq and not value:
            raise InvdiffError(f"{flag}: empty value; pass a value or leave the flag out")
        if arg == "":
            where = argv[i - 1] if i and argv[i - 1].startswith("-") else "an argument"
            raise InvdiffError(f"{where}: empty value; pass a value or leave it out")


def check_command(command: str, func, values: dict[str, Any]) -> None:
    """Check every given value against its rule, then the command's combinations. Raises InvdiffError."""
    for param in params(func):
        value = values.get(param.name)
        if value is None or param.type is bool:
            continue
        rule = rule_for(command, param)
        for item in (value if param.multiple else [value]):
            check_value(param, rule, item)
    _check_distinct_outputs(command, func, values)
    for combo in COMBOS.get(command, ()):
        combo(values)


def _check_distinct_outputs(command: str, func, values: dict[str, Any]) -> None:
    """Two output flags naming one path would overwrite each other (and the second lock blamed another process)."""
    seen: dict[Path, str] = {}
    for param in output_params(command, func):
        if values.get(param.name) is not None:
            path = Path(values[param.name]).resolve()
            if path in seen:
                raise InvdiffError(f"{param.flag} {values[param.name]}: the same path as {seen[path]}; "
                                   "pass another path")
            seen[path] = param.flag


def check_value(param: Param, rule: Rule, value: Any) -> None:
    if param.type is Path:
        _check_suffix(param.flag, rule, Path(value))
        return check_path(param.flag, rule.path, Path(value), rule.marker)
    if param.type is str:
        return _check_text(param.flag, rule, value)
    _check_number(param.flag, rule, value)


def _check_number(flag: str, rule: Rule, value) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvdiffError(f"{flag} {value}: not a finite number; pass a finite value")
    note = f" ({rule.note})" if rule.note else ""
    if rule.min is not None and value < rule.min:
        raise InvdiffError(f"{flag} {value}: must be at least {_num(rule.min)}{note}")
    if rule.above is not None and value <= rule.above:
        raise InvdiffError(f"{flag} {value}: must be greater than {_num(rule.above)}{note}")
    if rule.max is not None and value > rule.max:
        raise InvdiffError(f"{flag} {value}: must be at most {_num(rule.max)}{note}")
    if rule.below is not None and value >= rule.below:
        raise InvdiffError(f"{flag} {value}: must be less than {_num(rule.below)}{note}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _check_text(flag: str, rule: Rule, value: str) -> None:
    if not value.strip():
        raise InvdiffError(f"{flag} {value!r}: blank; pass a non-empty value")
    if rule.path == "model":
        return _check_model(flag, value)
    items = [v.strip() for v in value.split(",")] if rule.comma else [value]
    if rule.comma and not all(items):
        raise InvdiffError(f"{flag} {value}: an empty item in the list; pass e.g. {flag} a,b")
    for item in items:
        _check_item(flag, rule, item, value)


def _check_item(flag: str, rule: Rule, item: str, value: str) -> None:
    if rule.choices is not None:
        allowed = list(rule.choices())
        if item not in allowed:
            what = f"unknown {item!r}" if rule.comma else "unknown"
            raise InvdiffError(f"{flag} {value}: {what}; choose one of {', '.join(allowed)}")
    elif rule.comma:  # a list of numbers (e.g. --batch-sizes)
        try:
            number = int(item)
        except ValueError:
            raise InvdiffError(f"{flag} {value}: {item!r} is not an integer; pass e.g. {flag} 1,8") from None
        _check_number(flag, rule, number)


def _check_model(flag: str, value: str) -> None:
    from .models.loader import BUILTIN_MODELS, check_not_single_file

    if value in BUILTIN_MODELS:
        return
    check_not_single_file(flag, Path(value))
    check_path(flag, "dir", Path(value))
    if not (Path(value) / "model_index.json").is_file():
        raise InvdiffError(f"{flag} {value}: not a diffusers model folder (no model_index.json); "
                           f"pass a model folder or one of {', '.join(BUILTIN_MODELS)}")


def _check_suffix(flag: str, rule: Rule, path: Path) -> None:
    if rule.suffixes and path.suffix.lower() not in rule.suffixes:
        raise InvdiffError(f"{flag} {path}: give a file name ending in {' or '.join(rule.suffixes)}")


def check_path(flag: str, kind: str | None, path: Path, marker: str = "") -> None:
    """Input kinds must exist as the right type; outputs must not be the wrong type; no path lies below a file; an
    output folder that an artifact replaces whole holds nothing else (`marker`: the artifact's manifest)."""
    _check_ancestors(flag, path)
    if kind in ("dir", "out_dir", "cache") and path.exists() and not path.is_dir():
        raise InvdiffError(f"{flag} {path}: is a file, not a folder; pass a folder")
    if kind in ("file", "out_file") and path.is_dir():
        raise InvdiffError(f"{flag} {path}: is a folder, not a file; pass a file path")
    if kind in ("dir", "file") and not path.exists():
        raise InvdiffError(f"{flag} {path}: not found; pass an existing {'folder' if kind == 'dir' else 'file'}")
    if kind == "prefix":
        _check_prefix(flag, path)
    if kind == "out_prefix":
        _check_out_prefix(flag, path)
    if kind == "out_file":
        _check_not_an_artifacts_file(flag, path)
    if kind in OUTPUT_KINDS + CACHE_KINDS:
        _check_writable(flag, path)
    if marker:
        check_replaceable(path, marker, flag)


def _check_ancestors(flag: str, path: Path) -> None:
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise InvdiffError(f"{flag} {path}: {parent} is a file, so nothing can be below it; pass another path")


def _prefix_files(path: Path) -> tuple[Path, Path]:
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    return Path(f"{stem}.json"), Path(f"{stem}.safetensors")


def _check_prefix(flag: str, path: Path) -> None:
    missing = [p for p in _prefix_files(path) if not p.is_file()]
    if missing:
        raise InvdiffError(f"{flag} {path}: {missing[0]} not found; pass the prefix written by `invdiff groups`")


def _check_out_prefix(flag: str, path: Path) -> None:
    if path.is_dir():  # a prefix names files, so PATH.json would land beside the folder, not in it
        raise InvdiffError(f"{flag} {path}: is a folder; pass a file prefix, e.g. {path / 'groups'} (writes "
                           "groups.json and groups.safetensors inside it)")
    folder = next((p for p in _prefix_files(path) if p.is_dir()), None)
    if folder is not None:
        raise InvdiffError(f"{flag} {path}: {folder} is a folder, so the groups cannot be written there; pass "
                           "another prefix")
    _check_groups_json(flag, path)


ARTIFACT_FILES = {*FOLDER_MARKERS.values(), "metadata.jsonl", "classifier.json", "run.json", "manifest.jsonl",
                  "invdiff_model.json", "state.json", "config.json", "scheduler_config.json"}
ARTIFACT_SUFFIXES = {".safetensors", ".onnx", ".plan", ".engine"}  # not .bin or .cache: a --timing-cache may be one


def _check_not_an_artifacts_file(flag: str, path: Path) -> None:
    """A report (`--json`, `--grid`, ...) never replaces a file an artifact or dataset is made of (e.g. `--json
    EXPORT/manifest.json`): the command would succeed and the artifact be gone."""
    if path.is_file() and (path.name in ARTIFACT_FILES or path.suffix in ARTIFACT_SUFFIXES):
        raise InvdiffError(f"{flag} {path}: an artifact's own file ({path.name}), which this would replace; pass a "
                           "new file name")


def _check_groups_json(flag: str, path: Path) -> None:
    """An existing PREFIX.json is a groups file (rerunning `groups` replaces it), not another artifact's."""
    target = _prefix_files(path)[0]
    try:
        ours = not target.exists() or read_json(target).get("format") == GROUPS_FORMAT
    except InvdiffError:  # not JSON, not an object, unreadable
        ours = False
    if not ours:
        raise InvdiffError(f"{flag} {path}: {target} is not an invdiff-rt groups file and would be replaced; pass "
                           "another prefix")


def _check_writable(flag: str, path: Path) -> None:
    target = next((p for p in [path, *path.parents] if p.is_dir()), Path("."))
    if not os.access(target, os.W_OK | os.X_OK):
        raise InvdiffError(f"{flag} {path}: {target} is not writable; pass a path you can write to")


# ---------------------------------------------------------------- combinations

def _generate_combos(values: dict[str, Any]) -> None:
    if bool(values.get("prompt")) == (values.get("prompts_file") is not None) and not values.get("merge"):
        raise InvdiffError("--prompt/--prompts: pass one of them (--prompt TEXT, repeatable, or --prompts FILE)")
    if values.get("merge"):
        return
    if (values.get("model") is None) == (values.get("export") is None):
        raise InvdiffError("--model/--export: pass exactly one (a model folder, or an export folder)")
    from .runtime.generate import check_export_adapter

    _check_backend_source(values.get("backend", "auto"), values.get("export"))
    check_export_adapter(values.get("adapter"), values.get("export"), values.get("backend", "auto"))
    _check_weight_has_adapter(values, values.get("export"))
    _check_precision(values.get("precision", "fp32"), values.get("backend", "auto"), values.get("export"))


def _check_backend_source(backend: str, export) -> None:
    """An engine backend runs an export folder, torch the model folder (before the model is loaded: minutes at SD
    scale); the error names the swap, since --model and --export are exclusive."""
    from .runtime.backends import NEEDS_EXPORT

    if backend in NEEDS_EXPORT and export is None:
        raise InvdiffError(f"--backend {backend}: runs an export folder; pass --export DIR instead of --model "
                           "(`invdiff export --model M --out DIR` makes one)")
    if backend in ("torch", "torch-cuda") and export is not None:
        raise InvdiffError(f"--backend {backend}: runs the model folder; pass --model instead of --export")


def _export_has_adapter(export) -> bool:
    if export is None:
        return False
    from .export.manifest import read_manifest

    return bool(read_manifest(export, verify=False).get("adapter"))


def _check_precision(precision: str, backend: str, export) -> None:
    """fp16 is honoured by torch-cuda only (engine backends run the export's own precision), bf16 by openvino only
    (a compile option on an fp32 export): refuse them elsewhere."""
    if precision == "bf16":
        return _check_bf16(backend, export)
    if precision == "fp32" or backend == "torch-cuda":
        return
    if export is not None:
        raise InvdiffError(f"--precision {precision}: an export runs at the precision it was exported with; "
                           "drop --precision (export with `invdiff export --precision fp16` instead)")
    if backend == "auto":
        from .runtime.backends import resolve_backend

        backend = resolve_backend("auto", model="given")
        if backend == "torch-cuda":
            return
    raise InvdiffError(f"--precision {precision}: the {backend} backend runs fp32 only; drop --precision "
                       "(fp16 needs --backend torch-cuda or an fp16 export)")


def _check_bf16(backend: str, export) -> None:
    from .runtime.backends import resolve_backend

    if export is None or resolve_backend(backend, export_dir=export) != "openvino":
        raise InvdiffError("--precision bf16: only the openvino backend runs bf16 (lossy, quality-gated in "
                           "bench/README.md); pass --backend openvino --export DIR, or drop --precision")


def _export_combos(values: dict[str, Any]) -> None:
    if values.get("precision") == "bf16":
        raise InvdiffError("--precision bf16: an export is fp32 or fp16; bf16 is a compile option of the openvino "
                           "backend on an fp32 export (`invdiff generate --backend openvino --precision bf16`)")


def _train_combos(values: dict[str, Any]) -> None:
    if values.get("recipe") == "erm" and values.get("groups_prefix") is not None:
        raise InvdiffError("--groups: the erm recipe uses no groups; drop --groups or pick another --recipe")
    if values.get("oracle_groups_from") and values.get("groups_prefix") is not None:
        raise InvdiffError("--groups: --oracle-groups-from builds the groups from the hidden column instead; "
                           "drop one of the two")
    _check_checkpoint_folder(values)
    if values.get("recipe") == "erm" and values.get("lam") not in (None, 0):
        raise InvdiffError(f"--lambda {values['lam']:g}: the erm recipe has one group, so the variance penalty is "
                           "always 0; drop --lambda or pick another --recipe")


def _check_checkpoint_folder(values: dict[str, Any]) -> None:
    """`train` and `pretrain` keep their checkpoint in OUT.ckpt, next to --out: it must not be a file."""
    out = values.get("out")
    ckpt = None if out is None else checkpoint_dir(out)
    if ckpt is not None and ckpt.exists() and not ckpt.is_dir():
        raise InvdiffError(f"--out {out}: {ckpt} (its checkpoint folder) is a file; move it away or pass another "
                           "--out")


def _demo_combos(values: dict[str, Any]) -> None:
    from .demo import check_demo_folder

    if values.get("out") is not None:
        check_demo_folder(values["out"])


def _groups_combos(values: dict[str, Any]) -> None:
    recipe, n_groups = values.get("recipe"), values.get("n_groups")
    if recipe == "erm":
        raise InvdiffError("--recipe erm: needs no groups; run `invdiff train --recipe erm` directly")
    if recipe == "invdiff-rt" and n_groups not in (None, 2) and not values.get("oracle_groups_from"):
        raise InvdiffError(f"--groups {n_groups}: recipe invdiff-rt always uses 2 groups (majority, inferred "
                           "minority); drop --groups or use --recipe paper")
    if values.get("oracle_groups_from") and n_groups is not None:
        raise InvdiffError(f"--groups {n_groups}: oracle groups are the hidden columns' (one group per combination "
                           "of values that occurs); drop --groups")
    ignored = _invdiff_rt_only(values) if recipe == "paper" else []
    if ignored:
        raise InvdiffError(f"{', '.join(ignored)}: only for --recipe invdiff-rt (paper draws one uniform t and fits "
                           "soft groups); drop the flag")


def _invdiff_rt_only(values: dict[str, Any]) -> list[str]:
    """The `groups` flags given away from their defaults that only the invdiff-rt recipe reads."""
    changed = {"--draws": values.get("draws") is not None, "--grid-samples": values.get("grid_samples") is not None,
               "--score": values.get("score") not in (None, "contrast"),
               "--outlier-k": values.get("outlier_k") not in (None, 3.0),
               "--independent-draws": values.get("antithetic") is False}
    return [flag for flag, given in changed.items() if given]


def _eval_combos(values: dict[str, Any]) -> None:
    _check_weight_has_adapter(values)
    json_out = values.get("json_out")
    if json_out is None or values.get("grid") is not None:
        return
    grid = Path(json_out).with_suffix(".png")  # eval's default grid path, checked like --grid
    if grid.resolve() == Path(json_out).resolve() or grid.is_dir():
        raise InvdiffError(f"--json {json_out}: the grid goes to {grid} by default, which is "
                           + ("this file too" if grid.resolve() == Path(json_out).resolve() else "a folder")
                           + "; name the report .json or pass --grid")


def _check_weight_has_adapter(values: dict[str, Any], export=None) -> None:
    """--adapter-weight weighs an adapter: refused when none is given (nor carried by `export`)."""
    if values.get("adapter_weight") is None or values.get("adapter") is not None or _export_has_adapter(export):
        return
    raise InvdiffError("--adapter-weight: weighs an adapter, and no adapter is given (--adapter, or an --export "
                       "made with one); pass one or drop --adapter-weight")


def _data_make_combos(values: dict[str, Any]) -> None:
    given = [f for f, k in (("--n-train", "n_train"), ("--n-test", "n_test")) if values.get(k) is not None]
    if given and values.get("recipe") != "shapes-habitats":
        raise InvdiffError(f"{', '.join(given)}: only for shapes-habitats; drop the flag for {values.get('recipe')}")
    n_test = values.get("n_test")
    if n_test is not None and n_test % 4:
        raise InvdiffError(f"--n-test {n_test}: the test split is balanced over 2 shapes x 2 backgrounds; pass a "
                           "multiple of 4")


def _tensorrt_combos(values: dict[str, Any]) -> None:
    """TensorRT asked for where it is not installed: the install hint before anything loads."""
    flag = "--backend" if "backend" in values else "--backends"
    if "tensorrt" in [b.strip() for b in (values.get(flag.lstrip("-")) or "").split(",")]:
        from .export.tensorrt import require_tensorrt

        require_tensorrt(f"{flag} tensorrt")


COMBOS: dict[str, tuple[Callable[[dict], None], ...]] = {
    "generate": (_tensorrt_combos, _generate_combos),
    "check": (_tensorrt_combos,),
    "bench": (_tensorrt_combos,),
    "export": (_export_combos,),
    "train": (_train_combos,),
    "pretrain": (_check_checkpoint_folder,),
    "demo": (_demo_combos,),
    "groups": (_groups_combos,),
    "eval": (_eval_combos,),
    "data make": (_data_make_combos,),
}


# ---------------------------------------------------------------- wiring

def guard(app) -> None:
    """Wrap every command of `app` (once): checks, then the output locks, then the command itself."""
    for path, info in commands(app):
        if not getattr(info.callback, "_invdiff_guarded", False):
            info.callback = _guarded(path, info.callback)


def _guarded(command: str, func):
    @functools.wraps(func)
    def run(**values):
        check_command(command, func, values)
        with ExitStack() as stack:
            for param in output_params(command, func):
                if values.get(param.name) is not None:
                    stack.enter_context(_lock(param.flag, Path(values[param.name])))
            return func(**values)

    run._invdiff_guarded = True
    return run


def _lock(flag: str, path: Path):
    from .artifacts import output_lock

    return output_lock(path, flag)
