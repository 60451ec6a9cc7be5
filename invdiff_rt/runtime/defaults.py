"""Sampling defaults shared by every command (a light module: no torch import, so `--help` stays fast)."""

SCHEDULERS = ("ddim", "dpm", "euler")
DEFAULT_STEPS = 25
# CFG scale of the mini-SD benchmarks; SD-1.5 checkpoints usually want 7.5 (pass --guidance-scale).
DEFAULT_GUIDANCE = 3.0
