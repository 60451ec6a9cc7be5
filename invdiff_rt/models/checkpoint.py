"""Resumable training checkpoints without pickle: module + optimizer tensors in safetensors, scalars in JSON, one
folder per checkpoint, replaced atomically. Used by `invdiff pretrain` and `invdiff train`."""

from __future__ import annotations

from pathlib import Path

import torch

from ..artifacts import atomic_dir, atomic_save_safetensors, atomic_write_json, read_json
from ..errors import InvdiffError


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


STATE, META = "state.safetensors", "state.json"


def save_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                    step: int, extra: dict | None = None) -> None:
    """Write the folder `path` (state.safetensors + state.json) under a temporary name and rename it into place:
    a save killed half-way leaves the previous checkpoint intact."""
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:  # a finite loss can still leave overflowed weights: never saved to resume from
        raise InvdiffError(f"{path}: weight {bad} is not finite at step {step} (training diverged); lower the "
                           "learning rate and start over (delete the checkpoint folder)")
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    with atomic_dir(path) as tmp:
        atomic_save_safetensors({**tensors, **opt_tensors}, tmp / STATE)
        atomic_write_json(tmp / META, {"step": step, "optimizer": opt_meta, **(extra or {})})


def read_checkpoint_meta(path: Path) -> dict:
    """The JSON half of a checkpoint (step, optimizer scalars and whatever `extra` was saved)."""
    return read_json(Path(path) / META, "training checkpoint")


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                    keys: tuple = (), refusal: str = "") -> dict:
    """Restore modules and optimizer in place; return the JSON metadata (with "step"). With `keys`, a checkpoint
    whose saved "key" (what it was made with) is none of them is refused with `refusal` before anything loads."""
    from safetensors.torch import load_file

    meta = read_checkpoint_meta(path)
    if keys and meta.get("key") not in keys:
        raise InvdiffError(f"{path}: {refusal}")
    try:
        tensors = load_file(str(Path(path) / STATE))
        for name, m in modules.items():
            prefix = f"{name}."
            m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    except Exception as err:  # safetensors' header errors, missing/misshapen keys, a hand-edited state.json
        raise damaged(path, err) from err
    return meta


def damaged(path: Path, err: Exception) -> InvdiffError:
    return InvdiffError(f"{path}: damaged checkpoint ({type(err).__name__}); delete it to start over")


def has_checkpoint(path: Path) -> bool:
    return (Path(path) / META).exists() and (Path(path) / STATE).exists()
