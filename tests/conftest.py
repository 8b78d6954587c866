"""Shared fixtures: the generated default model, an in-process diffusers reference, the real tritonserver."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from triton_backend.config import disable_tf32

from .fakes import slow_lora_store
from .helpers import LORA_DELAY_S, start_server

disable_tf32()  # references in fp32 mean fp32 on CUDA too (no-op on the CPU)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from triton_backend.tools.default_model import write_default_model

    return write_default_model(tmp_path_factory.mktemp("models") / "default")


@pytest.fixture(scope="session")
def sdxl_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from triton_backend.tools.default_model import write_default_model

    return write_default_model(tmp_path_factory.mktemp("models") / "sdxl", arch="sdxl")


@pytest.fixture(scope="session")
def local(model_dir: Path):
    """Every stage of the SD default model in this process (:class:`~triton_backend.pipeline.LocalPipeline`)."""
    from triton_backend.pipeline import LocalPipeline

    pipe = LocalPipeline(model_dir)
    yield pipe
    pipe.close()


@pytest.fixture(scope="session")
def reference(model_dir: Path):
    """A callable: ``GenerationRequest`` → uint8 image from ``StableDiffusionPipeline`` run in-process."""
    from diffusers import StableDiffusionPipeline

    from triton_backend.schedulers import make_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    base = pipe.scheduler

    def run(request, scheduler=None) -> np.ndarray:
        """``scheduler``: a diffusers scheduler to use instead of the one the table builds for the request."""
        pipe.scheduler = scheduler or make_scheduler(request.scheduler, base, seed=request.seed)
        out = pipe(
            request.prompt,
            negative_prompt=request.negative_prompt,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            height=request.height or None,
            width=request.width or None,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            output_type="np",
        ).images[0]
        return (out * 255).round().astype(np.uint8)

    run.pipe = pipe
    run.base_scheduler = base  # the model's own scheduler: pipe.scheduler changes with every call
    return run


@pytest.fixture(scope="session")
def sdxl_reference(sdxl_model_dir: Path):
    """A callable: ``GenerationRequest`` → uint8 image from diffusers' SDXL pipelines, in-process.

    ``StableDiffusionXLPipeline``; ``StableDiffusionXLControlNetPipeline`` (``MultiControlNetModel`` for several)
    when the request has ControlNets; its LoRAs loaded with ``load_lora_weights`` + ``set_adapters`` +
    ``fuse_lora`` before the call (k = 0) and unloaded after. No invisible watermark (SwiftDiffusion adds none).
    """
    from diffusers import (
        ControlNetModel,
        MultiControlNetModel,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLPipeline,
    )
    from PIL import Image

    from triton_backend.schedulers import make_scheduler

    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_model_dir), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    base = pipe.scheduler

    def run(request) -> np.ndarray:
        kwargs: dict = {}
        call = pipe
        if request.controlnet_names:
            store = sdxl_model_dir / "controlnets"
            nets = [ControlNetModel.from_pretrained(str(store / n)) for n in request.controlnet_names]
            one = len(nets) == 1
            components = {k: v for k, v in pipe.components.items() if k != "scheduler"}
            call = StableDiffusionXLControlNetPipeline(
                **components,
                scheduler=base,
                controlnet=nets[0] if one else MultiControlNetModel(nets),
                add_watermarker=False,
            )
            call.set_progress_bar_config(disable=True)
            images = [Image.fromarray(img) for img in request.controlnet_images]
            cn = request.controlnets
            kwargs = {
                "image": images[0] if one else images,
                "controlnet_conditioning_scale": cn[0][1] if one else [c[1] for c in cn],
                "control_guidance_start": cn[0][2] if one else [c[2] for c in cn],
                "control_guidance_end": cn[0][3] if one else [c[3] for c in cn],
            }
        call.scheduler = make_scheduler(request.scheduler, base, seed=request.seed)
        names = [n for n, _ in request.loras]
        try:
            for name in names:
                pipe.load_lora_weights(str(sdxl_model_dir / "loras" / f"{name}.safetensors"), adapter_name=name)
            if names:
                pipe.set_adapters(names, adapter_weights=[s for _, s in request.loras])
                pipe.fuse_lora(adapter_names=names)
            out = call(
                request.prompt,
                prompt_2=request.prompt_2,
                negative_prompt=request.negative_prompt,
                negative_prompt_2=request.negative_prompt_2,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                height=request.height or None,
                width=request.width or None,
                original_size=tuple(request.original_size) or None,
                crops_coords_top_left=tuple(request.crops_coords_top_left) or (0, 0),
                target_size=tuple(request.target_size) or None,
                generator=torch.Generator("cpu").manual_seed(request.seed),
                output_type="np",
                **kwargs,
            ).images[0]
        finally:
            if names:
                pipe.unfuse_lora()
                pipe.unload_lora_weights()
        return (out * 255).round().astype(np.uint8)

    run.pipe = pipe
    return run


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Our model repository on the SD default model, once per test run."""
    # Every lora_manager response waits LORA_DELAY_S (the store tests.fakes:SlowLoraStore, parameter lora_store), so
    # a 4-step request always reaches its bound k first and the landing step is deterministic (== LORA_BOUND_K).
    # Stages append timestamps to this trace file (ControlNet overlap test).
    # The split layout, as a GPU deployment runs it: every step a BLS call to unet, the ControlNet service in its
    # own process (batched, overlapping the encoder half). The cpu layout (serve's on a CPU) is default_server.
    trace = tmp_path_factory.mktemp("trace") / "trace.jsonl"
    env = {"SWIFTDIFFUSION_TRACE_FILE": str(trace)}
    overrides = {"lora_manager": {"lora_store": slow_lora_store(delay_s=LORA_DELAY_S)}}
    srv = start_server(model_dir, tmp_path_factory.mktemp("triton"), env, layout="split", overrides=overrides)
    srv.trace_file = trace
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def default_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The cpu layout (what ``serve`` renders on a CPU): the UNet, its ControlNets and the hint embedding run in
    ``denoise``'s process; stages append timestamps to ``trace_file``.
    """
    trace = tmp_path_factory.mktemp("trace-default") / "trace.jsonl"
    srv = start_server(model_dir, tmp_path_factory.mktemp("triton-default"), {"SWIFTDIFFUSION_TRACE_FILE": str(trace)})
    srv.trace_file = trace
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def sdxl_server(sdxl_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The same model repository on the SDXL default model (the architecture comes from the model directory)."""
    srv = start_server(sdxl_model_dir, tmp_path_factory.mktemp("triton-sdxl"))
    yield srv
    srv.stop()


@pytest.fixture()
def sdxl_client(sdxl_server):
    from swiftdiffusion_client import Client

    with Client(sdxl_server.grpc_url, timeout_s=120) as c:
        yield c


@pytest.fixture()
def client(server):
    from swiftdiffusion_client import Client

    with Client(server.grpc_url, timeout_s=120) as c:
        yield c
