"""The tested dependency set: the environment `make test` built holds exactly the versions of constraints.txt."""

from __future__ import annotations

import os
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import deps  # noqa: E402

LOCK = ROOT / "constraints.txt"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.skipif(os.environ.get("INVDIFF_UPGRADE_CHECK") == "1", reason="make upgrade-check runs newer versions")
def test_installed_versions_equal_the_lock():
    pins = deps.read_lock(LOCK)
    installed = {_norm(d.metadata["Name"]): d.version for d in metadata.distributions()}
    assert len(pins) >= 40 and {"torch", "typer", "click", "diffusers", "onnxruntime"} <= {_norm(n) for n in pins}
    # a local label (torch 2.13.0+cpu, or a CUDA build 2.13.0+cu128) matches the pin like pip's `==` does
    wrong = {name: (want, installed.get(_norm(name))) for name, want in pins.items()
             if (installed.get(_norm(name)) or "").split("+")[0] != want}
    assert not wrong, f"installed versions differ from {LOCK.name} (rerun `make test`, or `make lock`): {wrong}"


def test_lock_covers_every_declared_dependency():
    pins = {_norm(n) for n in deps.read_lock(LOCK)}
    declared = {_norm(re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]) for spec in deps.unbounded(keep=())}
    assert declared <= pins, declared - pins
    assert all("<" not in spec for spec in deps.unbounded()) and "torch" in declared
    assert not any(spec.startswith("torch") for spec in deps.unbounded())
