"""Peers for `invdiff bench --peers`: what a CPU user would run instead of invdiff-rt, on the same model folder.

- `optimum-ort`: Hugging Face Optimum's `ORTStableDiffusionPipeline` (package `optimum-onnx`, ONNX Runtime CPU);
- `openvino`: optimum-intel's `OVStableDiffusionPipeline` (OpenVINO CPU), reshaped to the static batch and size as
  optimum-intel's documentation recommends, with its default OpenVINO properties (what a user gets).

Each pipeline is exported from the diffusers model folder once (into the bench's temporary folder), given the same
scheduler as ours (--scheduler; DDIM without x0 clipping) and --threads, and called with the same prompts, steps, CFG
scale and batch. A call covers what ours covers per image: tokenize + text encoder, the denoising loop, the VAE
decode (numpy output, no PIL conversion). The packages are an optional extra in their own venv
(`make peers-venv`, then `--peers-python .venv-peers/bin/python`); without them a peer is skipped with one printed
line.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PEER_RECORD_KEYS = ("peer", "backend", "batch_size", "e2e_ms_p50", "e2e_ms_rounds", "per_image_ms_p50",
                    "images_per_s", "peak_mem_mb", "versions", "settings")


@dataclass(frozen=True)
class Peer:
    name: str
    module: str  # import path of the pipeline class
    cls: str
    packages: tuple[str, ...]  # distributions whose versions are recorded (and must be installed)


PEERS = {
    "optimum-ort": Peer("optimum-ort", "optimum.onnxruntime", "ORTStableDiffusionPipeline",
                        ("optimum-onnx", "optimum", "onnxruntime", "transformers", "diffusers")),
    "openvino": Peer("openvino", "optimum.intel", "OVStableDiffusionPipeline",
                     ("optimum-intel", "optimum", "openvino", "transformers", "diffusers")),
}


def missing_reason(name: str) -> str | None:
    """Why a peer cannot run in this interpreter (None when it can)."""
    peer = PEERS[name]
    for dist in peer.packages:
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return f"{dist} is not installed"
    top = peer.module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        return f"module {top} is not importable"
    return None


def skip_line(name: str, reason: str) -> str:
    """The one line printed for a peer that cannot run."""
    return (f"peer {name}: skipped ({reason}); `make peers-venv`, then pass --peers-python "
            ".venv-peers/bin/python (the peers pin older transformers: their own venv)")


def versions(name: str) -> dict[str, str]:
    return {dist: importlib.metadata.version(dist) for dist in PEERS[name].packages}


def scheduler_like_ours(scheduler_config: dict, name: str):
    """The scheduler our sampling loop uses for `name` (--scheduler; ddim without x0 clipping), from the pipeline's
    own config."""
    from .runtime.sampling import make_scheduler

    return make_scheduler(dict(scheduler_config), name)


class PeerRunner:
    """A loaded peer pipeline: `__call__(batch)` generates `batch` images end to end (numpy output)."""

    def __init__(self, name: str, model_dir: str | Path, work_dir: str | Path, cfg: dict):
        import importlib

        peer = PEERS[name]
        self.name, self.cfg = name, cfg
        pipeline_cls = getattr(importlib.import_module(peer.module), peer.cls)
        self.cache = Path(work_dir) / f"peer-{name}"
        self.pipe = self._load(pipeline_cls, Path(model_dir), self.cache)
        self.pipes = {None: self.pipe}  # openvino: one pipeline per static batch (a compiled one cannot reshape)
        self.height, self.width = self._size(cfg.get("latent_shape"))

    def _size(self, latent_shape) -> tuple[int, int]:
        """The bench's --height/--width (its latent shape), else the pipeline's own size."""
        factor, unet = int(self.pipe.vae_scale_factor), self.pipe.unet.config
        if latent_shape:
            return int(latent_shape[1]) * factor, int(latent_shape[2]) * factor
        sample = unet["sample_size"] if isinstance(unet, dict) else unet.sample_size
        return int(sample) * factor, int(sample) * factor

    def settings(self) -> dict:
        """What the peer runs with (recorded next to its numbers)."""
        return {"pipeline": PEERS[self.name].cls, "scheduler": type(self.pipe.scheduler).__name__,
                "steps": self.cfg["steps"], "guidance_scale": self.cfg["guidance_scale"],
                "height": self.height, "width": self.width, **self._runtime_settings()}

    def _runtime_settings(self) -> dict:
        if self.name != "openvino":
            return {"intra_op_num_threads": self.cfg.get("threads") or "onnxruntime's default"}
        return {"ov_config": dict(getattr(self.pipe, "ov_config", {}) or {})}

    def _runtime_kwargs(self) -> dict[str, Any]:
        """--threads for the peer's own runtime, as ours get it (torch.set_num_threads reaches neither ONNX Runtime
        nor OpenVINO); without it, the runtime's defaults (what a user gets)."""
        threads = self.cfg.get("threads")
        if self.name == "openvino":
            return {"compile": False, **({"ov_config": {"INFERENCE_NUM_THREADS": str(threads)}} if threads else {})}
        if not threads:
            return {}
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(threads)
        return {"session_options": options}

    def _load(self, pipeline_cls, model_dir: Path, cache: Path):
        """Export once into `cache` (the optimum way: from_pretrained(export=True) + save_pretrained), then load."""
        kwargs = self._runtime_kwargs()
        if not (cache / "model_index.json").exists():
            pipe = pipeline_cls.from_pretrained(str(model_dir), export=True, **kwargs)
            pipe.save_pretrained(str(cache))
        pipe = pipeline_cls.from_pretrained(str(cache), **kwargs)
        pipe.scheduler = scheduler_like_ours(pipe.scheduler.config, self.cfg.get("scheduler", "ddim"))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline(self, batch: int):
        """OpenVINO: a pipeline reshaped to the static batch and size, then compiled (optimum-intel's recommended
        CPU setup); ONNX Runtime: the one dynamic pipeline."""
        if self.name != "openvino":
            return self.pipe
        if batch not in self.pipes:
            pipe = self.pipe if len(self.pipes) == 1 else self._load(type(self.pipe), self.cache, self.cache)
            pipe.reshape(batch_size=batch, height=self.height, width=self.width, num_images_per_prompt=1)
            # optimum-intel 1.27 reshapes the VAE decoder to `num_images_per_prompt` images, not batch x that, so
            # a static batch > 1 fails at decode; give it the batch the pipeline decodes
            pipe.vae_decoder.model = pipe._reshape_vae_decoder(pipe.vae_decoder.model, self.height, self.width, batch)
            pipe.clear_requests()
            pipe.compile()
            self.pipes[batch] = pipe
        return self.pipes[batch]

    def __call__(self, prompts: list[str]):
        out = self.pipeline(len(prompts))(prompt=prompts, num_inference_steps=self.cfg["steps"],
                        guidance_scale=self.cfg["guidance_scale"], height=self.height, width=self.width,
                        output_type="np")
        return out.images


class PeerServer:
    """A peer's worker: `hello()` loads the pipeline (or says why it is skipped); `handle({"batch": B})` is one
    round: `repeats` end-to-end calls (after `warmup` untimed ones the first time a batch is seen)."""

    def __init__(self, job: dict):
        self.job, self.name, self.cfg = job, job["peer"], job["config"]
        self.runner: PeerRunner | None = None
        self.seen: set[int] = set()

    def hello(self) -> dict:
        reason = missing_reason(self.name)
        if reason is not None:
            return {"skip": skip_line(self.name, reason)}
        if self.cfg.get("threads"):
            import torch

            torch.set_num_threads(int(self.cfg["threads"]))
        self.runner = PeerRunner(self.name, self.job["model"], self.job["work_dir"], self.cfg)
        return {"peer": self.name, "versions": versions(self.name), "settings": self.runner.settings()}

    def handle(self, request: dict) -> dict:
        from .bench import PROMPT, peak_host_mb, time_calls

        batch = int(request["batch"])
        prompts = [PROMPT.format(i % 10) for i in range(batch)]
        first = batch not in self.seen
        self.seen.add(batch)
        times = time_calls(lambda: self.runner(prompts), max(1, self.cfg["warmup"]) if first else 0,
                           self.cfg["repeats"], lambda: None)
        return {"e2e": times, "peak_host_mb": peak_host_mb()}
