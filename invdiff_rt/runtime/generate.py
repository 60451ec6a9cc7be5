"""Batch generation: deterministic per (seed, prompt, index), resumable after a crash, sharded across launcher ranks.

Layout of an output folder DIR:
    DIR/run.json                         settings + fingerprints of the first run (a rerun must match them)
    DIR/<prompt-slug>/<index:05d>.png    one image per job, written atomically
    DIR/<prompt-slug>/grid.png           all finished images of that prompt
    DIR/manifest.jsonl                   one line per image, sorted by (prompt, index)
    DIR/manifest.rank<r>-of-<w>.jsonl    the per-rank part under `torchrun` / `accelerate launch`

An image counts as finished when a manifest line with the current settings names it and the PNG's sha256 matches,
so a killed run loses at most the batch in flight. Under several ranks, every rank appends to its own part and the
rank that finds the job list complete (the last one to finish) writes the sorted union `manifest.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..artifacts import (append_jsonl, atomic_save_image, atomic_write_bytes, atomic_write_json, atomic_write_text,
                         package_versions, read_json, read_jsonl, sha256_bytes, sha256_file, taking_turns)
from ..errors import InvdiffError

MANIFEST = "manifest.jsonl"
RUN_FILE = "run.json"
GRID = "grid.png"
REPLACES = "replaces"  # run.json: the replaced runs' files, removed when the --overwrite run finishes
GRID_TILES = 64  # a grid shows a prompt's first 64 images: 1,000 SD images would tile into a 16k x 16k PNG
_PART_RE = re.compile(r"^manifest\.rank(\d+)-of-(\d+)\.jsonl$")


@dataclass(frozen=True, order=True)
class Job:
    """One image to generate: sorting jobs sorts by (prompt, index)."""

    prompt: str
    index: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.prompt, self.index)

    @property
    def file(self) -> str:
        """Path relative to the output folder."""
        return f"{prompt_slug(self.prompt)}/{self.index:05d}.png"


@dataclass
class GenerationResult:
    out_dir: Path
    written: int
    skipped: int
    seconds: float
    backend: str
    rank: int = 0
    world_size: int = 1
    manifest: Path | None = None  # the merged manifest, when this process wrote it
    grids: list[Path] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        where = f" (rank {self.rank} of {self.world_size})" if self.world_size > 1 else ""
        return (f"{self.written} images written, {self.skipped} skipped, {self.seconds:.1f} s, "
                f"{self.images_per_s:.2f} images/s, backend {self.backend}{where} -> {self.out_dir}")


# ---------------------------------------------------------------- planning

def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and `#` comments are ignored."""
    path = Path(path)
    if not path.is_file():
        raise InvdiffError(f"--prompts {path}: file not found; pass a text file with one prompt per line")
    from ..data.folder import read_text_lines

    prompts = [line.strip() for line in read_text_lines(path, "--prompts")]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise InvdiffError(f"--prompts {path}: no prompts (only blank or # lines); add one prompt per line")
    return prompts


def prompt_slug(prompt: str) -> str:
    """A readable, collision-free folder name: up to 48 slug characters plus 8 hex digits of the prompt's hash."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].strip("-") or "prompt"
    return f"{slug}-{sha256_bytes(prompt.encode())[:8]}"


def plan_jobs(prompts: Iterable[str], num: int) -> list[Job]:
    """All (prompt, index) pairs for `num` images per distinct prompt, sorted."""
    prompts = sorted(set(prompts))
    if num < 1:
        raise InvdiffError(f"--num {num}: must be at least 1")
    if not prompts:
        raise InvdiffError("--prompt: no prompts given; pass --prompt TEXT or --prompts FILE")
    return [Job(p, i) for p in prompts for i in range(num)]


def shard(jobs: Sequence[Job], rank: int, world_size: int) -> list[Job]:
    """Rank r's disjoint, deterministic share: round-robin over the sorted job list."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvdiffError(f"RANK={rank} WORLD_SIZE={world_size}: need 0 <= RANK < WORLD_SIZE")
    return sorted(jobs)[rank::world_size]


def dist_env(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world_size) from `torchrun` / `accelerate launch` variables; (0, 1) for a plain process."""
    env = os.environ if env is None else env
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE")):
        if rank_var in env or world_var in env:
            try:
                rank, world = int(env.get(rank_var, "0")), int(env.get(world_var, "1"))
            except ValueError:
                raise InvdiffError(f"{rank_var}/{world_var}: not integers; unset them or use torchrun") from None
            shard([], rank, world)  # validates
            return rank, world
    return 0, 1


def part_name(rank: int, world_size: int) -> str:
    """The manifest file this process appends to (`manifest.jsonl` for a single process)."""
    return MANIFEST if world_size == 1 else f"manifest.rank{rank}-of-{world_size}.jsonl"


# ---------------------------------------------------------------- settings (run.json)

def make_settings(*, seed: int, steps: int, guidance_scale: float, adapter_weight: float, scheduler: str,
                  backend: str, fingerprints: Mapping[str, str | None] | None = None, **extra) -> dict:
    """Everything that changes an image's pixels, JSON-normalised (so it compares equal to what run.json holds)."""
    settings = {"seed": int(seed), "steps": int(steps), "guidance_scale": float(guidance_scale),
                "adapter_weight": float(adapter_weight), "scheduler": scheduler, "backend": backend,
                **dict(fingerprints or {}), **extra}
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def check_run_file(out_dir: Path, settings: dict, overwrite: bool = False) -> bool:
    """Write DIR/run.json on first use; refuse different settings unless `overwrite`. True if the recorded settings
    were others (a damaged run.json replaced under --overwrite is not: every manifest line carries its settings);
    then run.json also lists the files of the runs it replaces (`REPLACES`), for the rank that finishes to remove."""
    path = out_dir / RUN_FILE
    old = _old_settings(path, overwrite) if path.exists() else None
    if path.exists() and old == settings:
        return False
    if old is not None and not overwrite:
        raise InvdiffError(f"{path}: {out_dir} was generated with other settings ({_diff(old, settings)}); "
                           f"use a new --out or pass --overwrite")
    replaces = _listed_files(out_dir) if old is not None else []  # removed once the new run has finished
    atomic_write_json(path, {"settings": settings, "versions": package_versions(),
                             **({REPLACES: replaces} if replaces else {})})
    return old is not None


def _old_settings(path: Path, overwrite: bool) -> dict | None:
    """The recorded settings; a damaged run.json (no settings object) is replaced under --overwrite (None), else a
    one-line error."""
    fix = "use a new --out or pass --overwrite"
    try:
        settings = read_json(path, "run settings", fix=fix).get("settings", {})
        if not isinstance(settings, dict):
            raise InvdiffError(f"{path}: run settings are not a JSON object (got {type(settings).__name__}); {fix}")
        return settings
    except InvdiffError:
        if overwrite:
            return None
        raise


def _diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k} {_short(old.get(k))} -> {_short(new.get(k))}" for k in keys)


def _short(value) -> str:
    text = str(value)
    return text[:12] if isinstance(value, str) and len(text) == 64 else text


def read_settings(out_dir: Path) -> dict:
    path = out_dir / RUN_FILE
    settings = read_json(path, "run settings (write it by running `invdiff generate` first)").get("settings")
    if not isinstance(settings, dict):
        raise InvdiffError(f"{path}: no settings recorded; rerun the `invdiff generate` command that made {out_dir}")
    return settings


# ---------------------------------------------------------------- manifests

def manifest_files(out_dir: Path) -> list[Path]:
    """manifest.jsonl and every rank part in DIR."""
    parts = sorted(p for p in out_dir.glob("manifest.rank*-of-*.jsonl") if _PART_RE.match(p.name))
    return [out_dir / MANIFEST, *parts]


def load_records(out_dir: Path, settings: dict) -> dict[tuple[str, int], dict]:
    """Latest record per (prompt, index) over all manifest files, only those made with `settings`."""
    records = {}
    for path in manifest_files(out_dir):
        for rec in read_jsonl(path):
            if rec.get("settings") == settings:
                records[(rec["prompt"], rec["index"])] = rec
    return records


def finished_records(out_dir: Path, settings: dict) -> dict[tuple[str, int], dict]:
    """`load_records` less the records whose PNG is missing or changed since (deleted or edited by hand): what the
    merged manifest lists and the grids show."""
    return {key: rec for key, rec in load_records(out_dir, settings).items() if _finished(out_dir, rec)}


def pending(jobs: Sequence[Job], out_dir: Path, settings: dict,
            records: Mapping[tuple[str, int], dict] | None = None) -> list[Job]:
    """Jobs without a finished image: no manifest line, or the PNG is missing or its sha256 differs."""
    records = load_records(out_dir, settings) if records is None else records
    return [job for job in jobs if not _finished(out_dir, records.get(job.key))]


def _finished(out_dir: Path, rec: dict | None) -> bool:
    if rec is None:
        return False
    path = out_dir / rec["file"]
    return path.is_file() and sha256_file(path) == rec["sha256"]


def merge_manifests(out_dir: Path, settings: dict | None = None, records: Mapping | None = None) -> Path:
    """Write the sorted union of all manifest files (current settings only, images that exist: `records` when the
    caller has them) to DIR/manifest.jsonl."""
    out_dir = Path(out_dir)
    settings = read_settings(out_dir) if settings is None else settings
    records = finished_records(out_dir, settings) if records is None else records
    lines = [json.dumps(records[k], sort_keys=True, default=str) + "\n" for k in sorted(records)]
    return atomic_write_text(out_dir / MANIFEST, "".join(lines))


def repair_torn_tail(path: Path) -> None:
    """Cut a torn last line (left by a killed writer) so that new lines start on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def remove_stale_tmp(out_dir: Path, files: Iterable[str]) -> int:
    """Delete temporaries (`.<name>.*.tmp`) that a killed atomic write left next to the given files."""
    removed = 0
    for rel in files:
        path = out_dir / rel
        for tmp in path.parent.glob(f".{path.name}.*.tmp") if path.parent.is_dir() else ():
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


# ---------------------------------------------------------------- grids

def write_grids(out_dir: Path, records: Mapping[tuple[str, int], dict]) -> list[Path]:
    """One `<slug>/grid.png` per prompt from its first GRID_TILES finished images (ceil(sqrt(n)) columns, black
    padding)."""
    from PIL import Image

    by_prompt: dict[str, list[dict]] = {}
    for key in sorted(records):
        by_prompt.setdefault(key[0], []).append(records[key])
    grids = []
    for prompt, recs in by_prompt.items():
        images = [Image.open(out_dir / r["file"]).convert("RGB") for r in recs[:GRID_TILES]]
        path = out_dir / prompt_slug(prompt) / GRID
        grids.append(atomic_save_image(image_grid(images), path))
    return grids


def image_grid(images: list) -> "Image.Image":
    """Tile equally sized PIL images row by row into ceil(sqrt(n)) columns."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    pad = [Image.new("RGB", images[0].size) for _ in range(rows * cols - len(images))]
    return make_image_grid(list(images) + pad, rows=rows, cols=cols)


# ---------------------------------------------------------------- the run

def run_generation(runtime, prompts: Sequence[str], out_dir: str | Path, *, num: int, seed: int = 0,
                   steps: int = 25, guidance_scale: float = 3.0, adapter_weight: float = 1.0,
                   scheduler: str = "ddim", batch_size: int = 8, backend: str | None = None,
                   fingerprints: Mapping[str, str | None] | None = None, overwrite: bool = False,
                   grid: bool = True, rank: int | None = None, world_size: int | None = None,
                   progress: bool = True, latent_shape: Sequence[int] | None = None) -> GenerationResult:
    """Generate this rank's share of `num` images per prompt into `out_dir`, skipping finished ones.

    `runtime`: anything `sampling.sample_images` accepts (a Runtime or a loaded model). `fingerprints`: hashes of
    what the images come from (model, adapter, export), stored in run.json and every manifest line.
    """
    if batch_size < 1:
        raise InvdiffError(f"--batch-size {batch_size}: must be at least 1")
    out_dir = Path(out_dir)
    env_rank, env_world = dist_env()
    rank, world_size = env_rank if rank is None else rank, env_world if world_size is None else world_size
    backend = backend or getattr(runtime, "name", None) or "torch"
    _check_prompt_words(runtime, prompts)
    jobs = plan_jobs(prompts, num)
    mine = shard(jobs, rank, world_size)
    settings = make_settings(seed=seed, steps=steps, guidance_scale=guidance_scale, adapter_weight=adapter_weight,
                             scheduler=scheduler, backend=backend, fingerprints=fingerprints,
                             **({"latent_shape": list(latent_shape)} if latent_shape else {}),
                             **batch_settings(backend, batch_size))
    check_own_folder(out_dir)
    made = [p for p in (*reversed(out_dir.parents), out_dir, out_dir / RUN_FILE) if not p.exists()]
    out_dir.mkdir(parents=True, exist_ok=True)
    part, kept = out_dir / part_name(rank, world_size), {}
    try:
        with taking_turns(out_dir, "run.json"):  # ranks: the first replaces run.json (and lists what it replaces)
            if overwrite and world_size == 1 and _replacing(out_dir, settings):
                kept = _replaceable(out_dir, part)
            changed = check_run_file(out_dir, settings, overwrite)
            _prepare_part(out_dir, part, changed)
        remove_stale_tmp(out_dir, _owned_files(jobs, mine, world_size))
        todo = pending(mine, out_dir, settings)
        start = time.perf_counter()
        _generate(runtime, todo, out_dir, part, settings, batch_size, progress, f"rank {rank}/{world_size}")
    except BaseException:  # e.g. non-finite values at the first batch, out of memory, Ctrl-C: a folder with no image
        if world_size == 1:  # yet is left as it was found
            _undo_empty_run(made, part, kept)
        raise
    seconds = time.perf_counter() - start
    result = GenerationResult(out_dir, len(todo), len(mine) - len(todo), seconds, backend, rank, world_size)
    _finish(result, jobs, settings, grid)
    return result


BATCH_INVARIANT = ("onnxruntime", "openvino")  # measured byte-identical across batch sizes and CPU threads


def batch_settings(backend: str, batch_size: int) -> dict:
    """torch's kernels round differently at other batch sizes and (CPU) thread counts: an image's pixels can move
    by 1/255 here and there. Wherever batch invariance was not measured (torch, and the GPU backends, whose
    libraries pick kernels by shape), the batch size is a setting and a short batch is padded to full size
    (`_generate`), so a resumed run equals an uninterrupted one; torch's CPU thread count is one too."""
    if backend in BATCH_INVARIANT:
        return {}
    import torch

    return {"batch_size": int(batch_size), **({"threads": torch.get_num_threads()} if backend == "torch" else {})}


def _owned_files(jobs: Sequence[Job], mine: Sequence[Job], world_size: int) -> list[str]:
    """Files only this process writes (so it may clear their stale temporaries): its PNGs; alone, also the rest."""
    if world_size > 1:
        return [job.file for job in mine]
    grids = {f"{prompt_slug(job.prompt)}/{GRID}" for job in jobs}
    return [job.file for job in jobs] + sorted(grids) + [MANIFEST, RUN_FILE]


def _prepare_part(out_dir: Path, part: Path, settings_changed: bool) -> None:
    """Start a fresh part and merged manifest after --overwrite changed the settings (until the new run finishes,
    the folder lists no image of the old ones); otherwise cut a torn last line."""
    if settings_changed:
        for path in dict.fromkeys((part, out_dir / MANIFEST)):
            path.unlink(missing_ok=True)
    repair_torn_tail(part)


def _replacing(out_dir: Path, settings: dict) -> bool:
    """Whether an --overwrite run replaces DIR's recorded settings (only then is the old run kept aside)."""
    path = out_dir / RUN_FILE
    return path.is_file() and _old_settings(path, True) not in (None, settings)


def _replaceable(out_dir: Path, part: Path) -> dict[Path, bytes]:
    """What a single-process --overwrite run with other settings replaces at its start (run.json, the manifest):
    kept to put back if it fails before its first image."""
    return {path: path.read_bytes() for path in (out_dir / RUN_FILE, out_dir / MANIFEST, part) if path.is_file()}


def _undo_empty_run(made: list[Path], part: Path, kept: Mapping[Path, bytes]) -> None:
    """Leave the folder as a run that failed before its first image found it (its run.json would refuse the
    corrected rerun as "other settings"): remove `made`, the folders (parents included) and run.json it found
    missing, and put back what an --overwrite replaced (`kept`)."""
    if part.exists() and part.stat().st_size:
        return
    part.unlink(missing_ok=True)
    for path in reversed(made):  # run.json, then the deepest folder first
        if path.is_file():
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    for path, data in kept.items():
        atomic_write_bytes(path, data)


def _listed_files(out_dir: Path) -> list[str]:
    """The images every manifest of DIR lists (the rank parts of a killed run too), their prompts' grids, and what
    an interrupted --overwrite run had still to remove."""
    files = set(_replaced(out_dir))
    for manifest in (m for m in manifest_files(out_dir) if m.is_file()):  # ranks list and delete them in turns
        for line in manifest.read_text(errors="replace").splitlines():
            record = _record(line)
            if isinstance(record.get("file"), str):
                files |= {record["file"], f"{Path(record['file']).parent.as_posix()}/{GRID}"}
    return sorted(files)


def _replaced(out_dir: Path) -> list[str]:
    """run.json's list of the replaced runs' files (empty when it has none or cannot be read)."""
    try:
        files = json.loads((out_dir / RUN_FILE).read_text()).get(REPLACES, [])
    except (OSError, ValueError, AttributeError):
        return []
    return [f for f in files if isinstance(f, str)] if isinstance(files, list) else []


def _record(line: str) -> dict:
    try:
        record = json.loads(line)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def remove_replaced(out_dir: Path, records: Mapping) -> None:
    """Once an --overwrite run with other settings has finished (whichever rank, after however many resumes) or its
    parts are merged (`generate --merge`): the replaced runs' images it did not make again (a smaller --num, other
    prompts) and their grids, which would mix two settings in one folder; then run.json drops the list."""
    replaced = _replaced(out_dir)
    if not replaced:
        return
    new = {record["file"] for record in records.values()}
    for rel in sorted(set(replaced) - new):
        path = out_dir / rel
        if path.resolve().is_relative_to(out_dir.resolve()) and path.suffix == ".png":
            path.unlink(missing_ok=True)
    run = read_json(out_dir / RUN_FILE, "run settings")
    atomic_write_json(out_dir / RUN_FILE, {k: v for k, v in run.items() if k != REPLACES})


def _generate_records(manifest: Path) -> bool:
    """Whether every line is an image record as `_save` writes it (a folder whose run.json was deleted)."""
    try:
        return all({"file", "sha256", "settings"} <= record.keys() for record in read_jsonl(manifest))
    except InvdiffError:
        return False


def check_own_folder(out_dir: Path) -> None:
    """--out holds nothing that looks like ours but is not: a manifest.jsonl of other records without run.json, or a
    run.json without generate's settings object, belongs to someone else (the merge would rewrite it)."""
    run, manifest = out_dir / RUN_FILE, out_dir / MANIFEST
    foreign = manifest if manifest.is_file() and not run.exists() and not _generate_records(manifest) else None
    if run.is_file() and foreign is None:
        try:
            foreign = None if "settings" in read_json(run, "run settings") else run
        except InvdiffError:
            return  # damaged: `check_run_file` says so (or replaces it under --overwrite)
    if foreign is not None:
        raise InvdiffError(f"--out {out_dir}: {foreign.name} was not written by `invdiff generate` and would be "
                           "replaced; pass a new or empty folder")
    other = _other_entry(out_dir)
    if other is not None:
        raise InvdiffError(f"--out {out_dir}: holds {other.name} but no generate run (no {RUN_FILE} or {MANIFEST}) "
                           "to add images to; pass a new or empty folder")


def _other_entry(out_dir: Path) -> Path | None:
    """The first visible entry of a --out that holds no generate run (no run.json, no manifest): another tool's
    folder, into which images would be mixed. None for a new, empty or generate folder."""
    if not out_dir.is_dir() or (out_dir / RUN_FILE).exists() or any(p.exists() for p in manifest_files(out_dir)):
        return None
    return next((p for p in sorted(out_dir.iterdir()) if not p.name.startswith(".")), None)


def _finish(result: GenerationResult, jobs: Sequence[Job], settings: dict, grid: bool) -> None:
    """If every planned job is finished (over all ranks), write the merged manifest, remove what the runs an
    --overwrite replaced left, and write the grids."""
    records = finished_records(result.out_dir, settings)
    if any(job.key not in records for job in jobs):
        return  # other ranks still running: the last one to finish merges
    result.manifest = merge_manifests(result.out_dir, settings, records)
    remove_replaced(result.out_dir, records)
    if grid:
        prompts = {job.prompt for job in jobs}
        result.grids = write_grids(result.out_dir, {k: r for k, r in records.items() if k[0] in prompts})


def _generate(runtime, todo: list[Job], out_dir: Path, part: Path, settings: dict, batch_size: int,
              progress: bool, label: str) -> None:
    from .sampling import sample_images

    with _progress_bar(progress) as bar:
        task = bar.add_task(f"generate {label}", total=len(todo))
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            padded = batch + batch[-1:] * (batch_size - len(batch)) if "batch_size" in settings else batch
            images = sample_images(runtime, [j.prompt for j in padded], [j.index for j in padded],
                                   seed=settings["seed"], steps=settings["steps"],
                                   guidance_scale=settings["guidance_scale"],
                                   adapter_weight=settings["adapter_weight"], scheduler=settings["scheduler"],
                                   batch_size=len(padded))
            for job, image in zip(batch, images):
                _save(job, image, out_dir, part, settings)
            bar.advance(task, len(batch))


def _save(job: Job, image, out_dir: Path, part: Path, settings: dict) -> None:
    """PNG first (atomic), then one complete manifest line: a kill in between only costs a regeneration."""
    from PIL import Image

    path = atomic_save_image(Image.fromarray(image), out_dir / job.file)
    append_jsonl(part, {"prompt": job.prompt, "seed": settings["seed"], "index": job.index, "file": job.file,
                        "sha256": sha256_file(path), "backend": settings["backend"], "settings": settings})


def _check_prompt_words(runtime, prompts: Sequence[str]) -> None:
    """A word-level tokenizer (the built-in models') reads an unknown word as one token: "a zebra" and "a giraffe"
    would be the same images under two names. CLIP's tokenizer knows every word."""
    from ..models.loader import check_known_words

    if getattr(runtime, "tokenizer", None) is not None:
        check_known_words(runtime.tokenizer, prompts, "--prompt/--prompts",
                          "use the words of the captions the model was trained on")


def _progress_bar(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, \
        TimeElapsedColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed or 0.0:.2f} images/s")

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                    TimeElapsedColumn(), disable=not enabled)


# ---------------------------------------------------------------- from paths (CLI, demo)

def generate(prompts: Sequence[str], out_dir: str | Path, *, model: str | Path | None = None,
             adapter: str | Path | None = None, export: str | Path | None = None, backend: str = "auto",
             precision: str = "fp32", threads: int | None = None, height: int | None = None,
             width: int | None = None, engines: str | Path = "engines", **kwargs) -> GenerationResult:
    """Load the runtime for a model (+ adapter) or an export folder, then `run_generation` (same keyword args).
    `height/width` (pixels) are checked against the export's range before anything is loaded."""
    from .resolution import requested_latent_shape

    shape = requested_latent_shape(model=model, export=export, height=height, width=width)
    runtime, name, fingerprints = load_generation_runtime(model=model, adapter=adapter, export=export,
                                                          backend=backend, precision=precision, threads=threads,
                                                          engines=engines)
    if shape is not None and tuple(shape) != tuple(runtime.latent_shape):  # the default size, given: as if not
        runtime.latent_shape = shape
        kwargs["latent_shape"] = list(shape)  # recorded in run.json: it changes the pixels
    return run_generation(runtime, prompts, out_dir, backend=name, fingerprints=fingerprints, **kwargs)


def load_generation_runtime(*, model=None, adapter=None, export=None, backend: str = "auto",
                            precision: str = "fp32", threads: int | None = None, engines: str | Path = "engines"):
    """-> (runtime, resolved backend name, fingerprints of the sources), on this rank's GPU when it uses one.
    `engines`: the TensorRT engine cache (`invdiff build --out`)."""
    if (model is None) == (export is None):
        raise InvdiffError("--model/--export: pass exactly one (a model folder, or an export folder)")
    from .backends import load_runtime, resolve_backend

    name = resolve_backend(backend, export_dir=export, model=model)
    check_export_adapter(adapter, export, name)
    from ..method.adapter import adapter_fingerprint, load_adapter

    fingerprints = {"model": None, "adapter": adapter_fingerprint(adapter) if adapter is not None else None,
                    "export": None, "precision": precision}  # with --export: the adapter refitted into TensorRT
    model_obj = adapter_obj = None
    if model is not None:
        from ..models.loader import load_model

        model_obj = load_model(model, device=_rank_device(name))
        fingerprints["model"] = model_obj.fingerprint
        if adapter is not None:
            adapter_obj = load_adapter(adapter, model_obj).to(model_obj.device)
    else:
        fingerprints["export"] = _export_fingerprint(Path(export))
        _rank_device(name)
    runtime = load_runtime(name, model=model_obj, adapter=adapter_obj, export_dir=export, precision=precision,
                           threads=threads, engines_dir=engines,
                           refit_adapter=adapter if export is not None else None)
    return runtime, name, fingerprints


def check_export_adapter(adapter, export, backend: str) -> None:
    """--adapter with --export: only TensorRT swaps adapters (into the engine, by `invdiff refit`); `auto` is
    judged by the backend it resolves to here."""
    if adapter is None or export is None:
        return
    from .backends import resolve_backend

    backend = resolve_backend(backend, export_dir=export)
    if backend != "tensorrt":
        raise InvdiffError(f"--adapter: an export folder already contains its adapter; drop --adapter (with "
                           f"--backend tensorrt it names the adapter `invdiff refit` put into the engine; the "
                           f"backend here is {backend})")


def guidance_for(scale: float | None, export) -> float:
    """--guidance-scale, or its default: 3.0, or 1 for an export made with --no-cfg (no unconditional half, so it
    cannot guide: another scale there would be recorded but not applied, and is refused)."""
    from ..export.manifest import read_manifest
    from .defaults import DEFAULT_GUIDANCE

    cfg = export is None or read_manifest(export, verify=False).get("cfg", True)
    if scale is not None and not cfg and scale != 1:
        raise InvdiffError(f"--guidance-scale {scale:g}: {export} was exported with --no-cfg and samples at scale 1 "
                           "only; drop --guidance-scale, or export without --no-cfg")
    return scale if scale is not None else DEFAULT_GUIDANCE if cfg else 1.0


def _export_fingerprint(export_dir: Path) -> str:
    """Hash of the export's recorded file hashes (its ONNX graphs and weights), not of its timestamps."""
    from ..artifacts import sha256_json
    from ..export.manifest import read_manifest

    return sha256_json(read_manifest(export_dir, verify=False).get("files", {}))


def _rank_device(backend: str) -> str:
    """cuda:LOCAL_RANK (one GPU per rank, made current) for GPU backends, else cpu."""
    import torch

    if backend not in ("tensorrt", "onnxruntime-cuda", "torch-cuda") or not torch.cuda.is_available():
        return "cpu"
    local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    torch.cuda.set_device(local)
    return f"cuda:{local}"
