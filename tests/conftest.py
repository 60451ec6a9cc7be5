import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DIGIT_PROMPTS = [f"a photo of the digit {d}" for d in range(10)]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Stable-Diffusion-format model directory (saved once per session)."""
    from invdiff_rt.models.tiny import save_random_model

    return save_random_model(tmp_path_factory.mktemp("tiny") / "model", DIGIT_PROMPTS, seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from invdiff_rt.models.loader import load_model

    return load_model(tiny_model_dir)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tests use tiny tensors and start subprocesses on a 2-core machine: one intra-op thread avoids OpenMP spin
    contention (measured 10-20x faster than two oversubscribed threads here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
