"""invdiff-rt: label-free debiasing of latent diffusion models (InvDiff) with a fused, fast runtime."""

__version__ = "0.1.0"
