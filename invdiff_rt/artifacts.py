"""Fingerprints, atomic writes and JSON manifests: the one home for all of it.

Every artifact (model, groups, adapter, ONNX export, engine, image set) is written to a temporary name and renamed
into place, so an interrupted run never leaves a truncated file behind.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import hashlib
import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import InvdiffError

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-serialisable object, independent of key order."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def fingerprint_files(root: str | Path, files: Iterable[str | Path]) -> str:
    """Hash of (relative path, content hash) pairs: changes when any file is renamed, added, removed or edited."""
    root = Path(root)
    h = hashlib.sha256()
    for rel in sorted(str(Path(f).relative_to(root) if Path(f).is_absolute() else f) for f in files):
        h.update(rel.encode())
        h.update(sha256_file(root / rel).encode())
    return h.hexdigest()


def fingerprint_dir(root: str | Path, suffixes: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()) -> str:
    """Fingerprint every file under `root` (optionally only those with the given suffixes)."""
    root = Path(root)
    files = [
        p.relative_to(root)
        for p in root.rglob("*")
        if p.is_file()
        and (suffixes is None or p.suffix in suffixes)
        and p.name not in exclude
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return fingerprint_files(root, files)


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: done once, at import, before any thread
    os.umask(mask)
    return mask


_UMASK = _read_umask()
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK  # what open() and mkdir() give under the umask


def _tmp_sibling(path: Path) -> Path:
    """A temporary next to `path`, with the mode a plain open() would give it (mkstemp makes it 0600: every
    artifact and image was unreadable to other users, e.g. a server reading an export or generated PNGs)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it is fsynced and renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), FILE_MODE)  # a writer may have replaced the file (safetensors makes its own, 0600)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def atomic_save_image(image, path: str | Path) -> Path:
    """Save a PIL image (format from the suffix of `path`) atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"))
    return path


# The file that marks each kind of artifact folder (its manifest): a writer replaces only an empty folder or one
# holding it (`atomic_dir`), and the CLI checks `--out` against the same name before any work (`validate.RULES`).
GROUPS_FORMAT = "invdiff-rt/groups"  # the `format` of a groups prefix's JSON (`invdiff groups`)
FOLDER_MARKERS = {"adapter": "adapter.json", "export": "manifest.json", "model": "model_index.json",
                  "dataset": "dataset.json", "classifiers": "attribute"}


def checkpoint_dir(out: str | Path) -> Path:
    """Where `train` and `pretrain` keep the resumable checkpoint of the artifact `out`: OUT.ckpt, beside it."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def holds_current_folder(path: str | Path) -> bool:
    """`path` is the current folder or one above it (an output that deletes or replaces it would take the cwd)."""
    return Path(path).resolve() in (Path.cwd(), *Path.cwd().parents)


def check_replaceable(path: str | Path, marker: str, flag: str = "--out") -> None:
    """An artifact folder replaces `path` whole: refuse a folder that holds other files than such an artifact (no
    `marker`, the artifact's manifest), which would be deleted (`classifier train --out DATA` removed the dataset)."""
    path = Path(path)
    if holds_current_folder(path):
        raise InvdiffError(f"{flag} {path}: the output replaces the whole folder, and this one holds the current "
                           "folder; pass a new folder")
    if path.is_dir() and any(path.iterdir()) and not (path / marker).exists():
        raise InvdiffError(f"{flag} {path}: holds other files (no {marker}), and the output replaces the whole folder; "
                           "pass a new or empty folder")


@contextlib.contextmanager
def atomic_dir(path: str | Path, marker: str | None = None) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it onto `path` when complete (replacing it); with
    `marker`, only an empty folder or one holding `marker` is replaced (`check_replaceable`). A symbolic link is
    followed: its target is replaced, the link kept."""
    path = Path(path).resolve()
    if marker:
        check_replaceable(path, marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_dirs(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(DIR_MODE)  # mkdtemp makes it 0700
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _remove_stale_dirs(path: Path) -> None:
    """Temporaries of `path` left by a killed run (`.<name>.*.tmp`, `.<name>.old`). The caller is the only writer
    of `path`: the CLI holds the output lock (`output_lock`) while a command runs."""
    for stale in [*path.parent.glob(f".{path.name}.*.tmp"), path.with_name(f".{path.name}.old")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one complete line with a single write + fsync. A crash never leaves a partial line that a reader
    trusts (a torn last line is ignored); a failed or short write (a full disk) is cut back off and raised."""
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(fd).st_size
    try:
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes)", str(path))
        os.fsync(fd)
    except OSError:
        os.ftruncate(fd, size)
        raise
    finally:
        os.close(fd)


def read_utf8(path: Path, where: str = "") -> str:
    """A UTF-8 text file's text (a leading byte-order mark, as Windows editors write, dropped), or a one-line error
    naming `where` (default: the path): unreadable (a folder, no permission) or not UTF-8 (with the line)."""
    where = where or str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvdiffError(f"{where}: unreadable ({e.strerror}); check the file") from e
    data = data.removeprefix(codecs.BOM_UTF8)  # then the line and byte of an error are the file's
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InvdiffError(f"{where}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save it as UTF-8") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """Read complete JSON lines; a torn last line (no newline) from a killed writer is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    data = read_utf8(path)
    lines = data.split("\n")
    for i, line in enumerate(lines[:-1] if not data.endswith("\n") else lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise InvdiffError(f"{path}:{i}: not valid JSON ({e.msg}); delete the line or the file and rerun") from e
        if not isinstance(out[-1], dict):
            raise InvdiffError(f"{path}:{i}: not a JSON object; delete the line or the file and rerun")
    return out


def read_json(path: str | Path, what: str = "file", fix: str = "regenerate it") -> dict:
    """A JSON object (every manifest and record is one), or a one-line error naming the file and `fix`."""
    path = Path(path)
    if not path.exists():
        raise InvdiffError(f"{path}: {what} not found")
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise InvdiffError(f"{path}: {what} is not valid JSON (line {e.lineno}: {e.msg}); {fix}") from e
    if not isinstance(data, dict):
        raise InvdiffError(f"{path}: {what} is not a JSON object (got {type(data).__name__}); {fix}")
    return data


_VERSIONED = ("invdiff-rt", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu",
              "openvino", "polygraphy", "tensorrt", "numpy", "accelerate", "safetensors")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu": _cpu_model(), "cores": os.cpu_count()}
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = props.name
            info["compute_capability"] = f"{props.major}.{props.minor}"
            info["cuda"] = torch.version.cuda
    except Exception:  # torch missing or broken CUDA: report CPU only
        pass
    info["versions"] = package_versions()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------- one writer per output

def _launcher_rank() -> str | None:
    """This process's rank in a launcher job (torchrun, accelerate), None for a plain process."""
    if os.environ.get("WORLD_SIZE", "1") == "1":
        return None
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))


def _lock_file(path: Path, rank: str) -> Path:
    """The lock of an output lives outside the working folder (nothing is created next to --out)."""
    key = sha256_bytes(f"{Path(path).resolve()}|{rank}".encode())[:32]
    folder = Path(tempfile.gettempdir()) / f"invdiff-locks-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / f"{key}.lock"


@contextlib.contextmanager
def output_lock(path: str | Path, flag: str = "--out") -> Iterator[None]:
    """Advisory lock (flock) on an output path for the duration of a command: a second process refuses at once.
    Launcher ranks share the output: each holds its rank's lock (a second job is refused at every rank number the
    first has; torchrun then stops it), and all of them share the plain lock that a plain process needs whole."""
    rank = _launcher_rank()
    with contextlib.ExitStack() as stack:
        if rank is not None:
            stack.enter_context(_flock(_lock_file(Path(path), ""), path, flag, shared=True))
        stack.enter_context(_flock(_lock_file(Path(path), rank or ""), path, flag, shared=False))
        yield


@contextlib.contextmanager
def _flock(lock: Path, path, flag: str, shared: bool) -> Iterator[None]:
    import fcntl

    fd = _acquire(lock, path, flag, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    try:
        os.ftruncate(fd, 0)  # the holder's pid for a refused process's message; a shared lock has several
        if not shared:
            os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        if not shared:  # a shared lock stays: another rank may hold it still
            lock.unlink(missing_ok=True)
        os.close(fd)


def _acquire(lock: Path, path, flag: str, mode: int) -> int:
    import fcntl

    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            who = f"another invdiff process (pid {holder}) is" if holder else "a launcher job's invdiff ranks are"
            raise InvdiffError(f"{flag} {path}: {who} writing it; wait for it to finish or pass another "
                               "path") from None
        if _same_file(fd, lock):  # not unlinked by a releasing holder between our open and our flock
            return fd
        os.close(fd)


@contextlib.contextmanager
def taking_turns(path: str | Path, step: str) -> Iterator[None]:
    """A blocking exclusive flock around a step that the processes sharing an output (a launcher job's ranks) must
    take one at a time, e.g. replacing run.json."""
    import fcntl

    fd = os.open(_lock_file(Path(path), step), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # the lock file stays: unlinking it could let two processes lock two files


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
