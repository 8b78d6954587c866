"""The shared test harness: image comparison, the real server, diffusers references, deterministic inputs.

Fixtures (the default models, the local pipeline, the servers, the diffusers reference pipelines) are in
``conftest.py``; everything a test module calls directly is here, so no test module imports another.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from triton_backend.schema import GenerationRequest

if TYPE_CHECKING:
    from triton_backend.stages.unet import StepInput, UNetStep

#: Images from Triton must match diffusers within this many uint8 levels at any pixel (docs/architecture.md
#: "Correctness").
MAX_PIXEL_DIFF = 2
#: ... and on average.
MEAN_PIXEL_DIFF = 0.05
#: Seconds the test server's lora_manager delays each response (see the ``server`` fixture).
LORA_DELAY_S = 1.0


def on_cuda() -> bool:
    """The suite runs against CUDA stages (``scripts/device_check.sh`` sets ``SWIFTDIFFUSION_TEST_DEVICE``)."""
    return os.environ.get("SWIFTDIFFUSION_TEST_DEVICE") == "cuda"


def render_layout(model_dir: Path, out: Path, layout: str = "cpu", **kwargs) -> Path:
    """The repository ``serve`` renders for one pipeline ``txt2img`` in ``layout`` (``render``'s ``kwargs``: e.g.
    ``overrides``). On CUDA (the device check) a CPU layout becomes ``1gpu`` in float32: the references are fp32.
    """
    from triton_backend.serving.repository import Layout, Pipeline, render

    chosen = Layout.named("1gpu", "float32") if on_cuda() and layout in ("cpu", "split") else Layout.named(layout)
    return render(out, [Pipeline("txt2img", model_dir)], chosen, stage_prefix="", load_stages=False, **kwargs)


def start_server(
    model_dir: Path,
    workdir: Path,
    env: dict[str, str] | None = None,
    layout: str = "cpu",
    overrides: dict[str, dict[str, str]] | None = None,
    **kwargs,
):
    """The real bundled tritonserver on free loopback ports, on the repository ``serve`` renders (``layout``,
    ``overrides``) unless ``model_repository`` is given; the log's tail is printed if it fails to start.
    """
    from triton_backend.serving.server import TritonServer

    if "model_repository" not in kwargs:
        kwargs["model_repository"] = render_layout(model_dir, workdir / "repository", layout, overrides=overrides)
    log = workdir / "server.log"
    if os.environ.get("SWIFTDIFFUSION_SERVER_LOG_DIR"):  # the device check keeps every server log in its results
        log = Path(os.environ["SWIFTDIFFUSION_SERVER_LOG_DIR"]) / f"{workdir.name}-{time.time_ns()}.log"
    srv = TritonServer(model_dir=model_dir, log_file=log, env=env or {}, **kwargs)
    try:
        srv.start(timeout=600)
    except Exception:
        print(log.read_text()[-5000:] if log.exists() else "(no log)")
        raise
    return srv


#: The installed ``swiftdiffusion`` command of this environment.
BIN = Path(sys.executable).parent / "swiftdiffusion"


def start_serve(model_dir: Path, workdir: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """``swiftdiffusion serve`` as a user runs it (its own process); returns it once ready, and what it printed."""
    proc = subprocess.Popen(
        [str(BIN), "serve", "--model-dir", str(model_dir), "--log-file", str(workdir / "server.log"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            break
        lines.append(line)
        if line.startswith("Ctrl-C"):
            break
    return proc, "".join(lines)


def children(pid: int) -> list[int]:
    """Child processes of ``pid``."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    """``pid`` exists (zombies count: reap before asking)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def full_request(seed: int = 1, steps: int = 3) -> GenerationRequest:
    """A request through every stage: text_encoder (with a text-encoder LoRA), lora_manager, denoise, unet,
    controlnet, vae."""
    return GenerationRequest(
        prompt="a red barn",
        seed=seed,
        steps=steps,
        lora_names=("pastel_peft",),
        lora_bound_k=0,
        controlnet_names=("edges",),
        controlnet_images=hint_images(1),
    )


def pixel_diff(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    """(max, mean) absolute difference in uint8 levels."""
    assert a.shape == b.shape, (a.shape, b.shape)
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(d.max()), float(d.mean())


def assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    worst, mean = pixel_diff(a, b)
    assert worst <= MAX_PIXEL_DIFF and mean <= MEAN_PIXEL_DIFF, f"max diff {worst}, mean diff {mean:.4f}"


def generate_concurrently(url: str, requests: list) -> list[np.ndarray]:
    """Send every request at once, one client per request; images in request order."""
    from concurrent.futures import ThreadPoolExecutor

    from swiftdiffusion_client import Client

    def one(req):
        with Client(url, timeout_s=300) as c:
            return c.generate(req)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


def assert_rejected_then_served(client, reference, override: dict, error: type, needle: str) -> None:
    """A request with ``override`` applied fails with ``error`` naming ``needle``; the next valid one is correct."""
    from swiftdiffusion_client import GenerationRequest

    inputs = GenerationRequest(prompt="a cat", steps=2).to_tensors()
    inputs.update(override)
    with pytest.raises(error) as info:
        client.infer_raw(inputs)
    assert needle in info.value.message
    good = GenerationRequest(prompt="a cat", seed=4, steps=3)
    assert_same_image(client.generate(good), reference(good))


def hint_images(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Deterministic hint images: stripes and noise, different per ControlNet."""
    g = np.random.default_rng(seed)
    yy, xx = np.indices((size, size))
    out = []
    for i in range(n):
        stripes = ((xx + (i + 1) * yy) // (4 + 2 * i) % 2 * 255).astype(np.uint8)
        noise = g.integers(0, 64, (size, size), dtype=np.uint8)
        out.append(np.stack([stripes, stripes // 2 + noise, 255 - stripes], axis=-1))
    return np.stack(out)


def diffusers_controlnet_image(reference, model_dir, req):
    """StableDiffusionControlNetPipeline (MultiControlNetModel for several) with the same components."""
    from diffusers import ControlNetModel, MultiControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    from triton_backend.schedulers import make_scheduler

    base = reference.pipe
    nets = [ControlNetModel.from_pretrained(str(model_dir / "controlnets" / n)) for n in req.controlnet_names]
    controlnet = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
    components = {k: v for k, v in base.components.items() if k != "scheduler"}
    pipe = StableDiffusionControlNetPipeline(
        **components,
        scheduler=make_scheduler(req.scheduler, reference.base_scheduler, seed=req.seed),
        controlnet=controlnet,
    )
    pipe.set_progress_bar_config(disable=True)
    images = [Image.fromarray(img) for img in req.controlnet_images]
    one = len(nets) == 1
    cn = req.controlnets
    out = pipe(
        req.prompt,
        negative_prompt=req.negative_prompt,
        image=images[0] if one else images,
        num_inference_steps=req.steps,
        guidance_scale=req.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(req.seed),
        controlnet_conditioning_scale=cn[0][1] if one else [c[1] for c in cn],
        control_guidance_start=cn[0][2] if one else [c[2] for c in cn],
        control_guidance_end=cn[0][3] if one else [c[3] for c in cn],
        output_type="np",
    ).images[0]
    return (out * 255).round().astype(np.uint8)


def diffusers_image(reference, req, loras, land_step=0):
    """diffusers: load_lora_weights + set_adapters + fuse_lora, before the call or at ``land_step`` (callback)."""
    pipe = reference.pipe
    names = [n for n, _ in loras]
    te_req = GenerationRequest(**{**req.__dict__, "lora_names": (), "lora_scales": ()})

    def load_and_fuse():
        for n in names:
            pipe.load_lora_weights(str(env_lora_dir(pipe) / f"{n}.safetensors"), adapter_name=n)
        pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
        pipe.fuse_lora(adapter_names=names)

    try:
        if land_step == 0:
            load_and_fuse()
            return reference(te_req)

        def callback(p, i, t, kwargs):  # after step land_step - 1: steps >= land_step run fused
            if i == land_step - 1:
                load_and_fuse()
            return kwargs

        return reference_with_callback(reference, te_req, callback)
    finally:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()


def env_lora_dir(pipe):
    from pathlib import Path

    return Path(pipe.config._name_or_path) / "loras"


def pipeline_image(pipe, req, **kwargs) -> np.ndarray:
    """A diffusers pipeline called with the request's prompts, steps, guidance and seed (a CPU generator, as the
    server seeds), plus ``kwargs``: its first image as uint8.
    """
    out = pipe(
        req.prompt,
        negative_prompt=req.negative_prompt,
        num_inference_steps=req.steps,
        guidance_scale=req.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(req.seed),
        output_type="np",
        **kwargs,
    ).images[0]
    return (out * 255).round().astype(np.uint8)


def reference_with_callback(reference, req, callback):
    from triton_backend.schedulers import make_scheduler

    pipe = reference.pipe
    pipe.scheduler = make_scheduler(req.scheduler, reference.base_scheduler, seed=req.seed)
    return pipeline_image(pipe, req, callback_on_step_end=callback)


def lora_request(loras: tuple[tuple[str, float], ...]) -> GenerationRequest:
    """A 4-step request with ``(name, scale)`` LoRAs patched in before the first step (k = 0)."""
    return GenerationRequest(
        prompt="an oil painting of a forest",
        seed=3,
        steps=4,
        lora_names=tuple(n for n, _ in loras),
        lora_scales=tuple(s for _, s in loras),
        lora_bound_k=0,
    )


@torch.inference_mode()
def unet_forward(unet: UNetStep, step: StepInput) -> torch.Tensor:
    """The plain reference for the stage's passes: one ``UNet2DConditionModel`` call with ``step.adapters`` patched
    in (no split halves, no frozen graph); the noise prediction ``[b, C, h, w]`` float32.
    """
    dev, dt = unet.cfg.device, unet.cfg.dtype
    with unet.cfg.compute():
        unet.patcher.ensure(step.adapters)
        out = unet.model(
            step.sample.to(dev, dt),
            step.timestep.reshape(-1).to(dev),
            encoder_hidden_states=step.encoder_hidden_states.to(dev, dt),
            added_cond_kwargs=step.added_cond_kwargs(dev, dt),
            return_dict=False,
        )[0]
        return out.float().cpu()


def optional_sampler(name: str):
    """A sampler name as a test parameter, skipped where its optional package (the ``[samplers]`` extra) is missing
    (the device bundle has no room for scipy)."""
    from triton_backend.schedulers import is_available

    return pytest.param(name, marks=pytest.mark.skipif(not is_available(name), reason="optional package missing"))
