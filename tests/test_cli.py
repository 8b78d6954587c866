"""The README's commands: ``swiftdiffusion serve`` + ``generate`` end to end, and a clean stop on SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from triton_backend.serving.cli import build_parser
from triton_backend.serving.server import free_port

from .helpers import BIN, alive, children, start_serve

pytestmark = pytest.mark.integration


def test_parser_has_the_documented_commands():
    parser = build_parser()
    args = parser.parse_args(
        ["serve", "--model-dir", "/m", "--grpc-port", "1", "--http-port", "2", "--metrics-port", "3"]
    )
    assert (args.model_dir, args.grpc_port, args.http_port, args.metrics_port, args.host) == (
        "/m",
        1,
        2,
        3,
        "127.0.0.1",
    )
    args = parser.parse_args(["generate", "--prompt", "x", "--scheduler", "ddim", "-o", "a.png"])
    assert args.scheduler == "ddim" and args.output == "a.png"
    assert parser.parse_args(["generate", "--prompt", "x", "--scheduler", "DPM++ 2M Karras"]).scheduler == (
        "dpmpp_2m_karras"
    )
    from swiftdiffusion_client.cli import request_from_args

    args = parser.parse_args(["generate", "--prompt", "x", "--original-size", "32", "40", "--target-size", "48", "48"])
    req = request_from_args(args)
    assert (req.original_size, req.crops_coords_top_left, req.target_size) == ((32, 40), (), (48, 48))
    assert parser.parse_args(["serve", "--arch", "sdxl"]).arch == "sdxl"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--prompt", "x", "--scheduler", "nope"])


def test_default_model_command_is_deterministic(tmp_path):
    for name in ("a", "b"):
        subprocess.run([str(BIN), "default-model", "--out", str(tmp_path / name)], check=True, capture_output=True)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_default_model_command_writes_sdxl(sdxl_model_dir, tmp_path):
    out = tmp_path / "xl"
    subprocess.run([str(BIN), "default-model", "--arch", "sdxl", "--out", str(out)], check=True, capture_output=True)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert (out / "text_encoder_2").is_dir()
    assert all((out / f).read_bytes() == (sdxl_model_dir / f).read_bytes() for f in files)
    bad = subprocess.run(
        [str(BIN), "default-model", "--arch", "sdxl", "--preset", "sd15", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown sdxl preset 'sd15'" in bad.stderr


def test_serve_generate_and_clean_stop(model_dir, reference, tmp_path):
    from PIL import Image

    from triton_backend.schema import GenerationRequest

    grpc, http, metrics = free_port(), free_port(), free_port()
    before = set(Path("/dev/shm").iterdir())  # other servers (the session fixture) may hold regions too
    proc, text = start_serve(
        model_dir, tmp_path, "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics)
    )
    try:
        assert f"127.0.0.1:{grpc}" in text and f"127.0.0.1:{http}" in text and f":{metrics}/metrics" in text, text
        assert "txt2img, txt2img_stream" in text and "CudaDriverHelper" not in text, text
        assert "layout cpu (auto: no GPU)" in text or torch.cuda.is_available(), text
        (server_pid,) = children(proc.pid)
        stubs = children(server_pid)
        # One Python stub per model instance, and only the models that run: txt2img, txt2img_stream, img2img,
        # img2img_stream, text_encoder, denoise (the UNet and the ControlNets), vae, lora_manager; no idle unet or
        # controlnet process.
        assert len(stubs) == 8 or torch.cuda.is_available(), text
        shm = [p for p in set(Path("/dev/shm").iterdir()) - before if p.name.startswith("swiftdiffusion_")]
        assert shm, "the server uses its own shared-memory prefix"

        out = tmp_path / "out.png"
        gen = subprocess.run(
            [
                str(BIN),
                "generate",
                "--url",
                f"127.0.0.1:{grpc}",
                "--prompt",
                "a photo of a cat",
                "--seed",
                "3",
                "--steps",
                "4",
                "--scheduler",
                "euler_a",
                "-o",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert gen.returncode == 0, gen.stderr
        image = np.asarray(Image.open(out))
        expected = reference(GenerationRequest(prompt="a photo of a cat", seed=3, steps=4, scheduler="euler_a"))
        assert np.abs(image.astype(int) - expected).max() <= 2

        hint = tmp_path / "hint.png"
        Image.fromarray(np.indices((64, 64)).sum(0).astype(np.uint8)[..., None].repeat(3, -1)).save(hint)
        adapters = subprocess.run(
            [
                str(BIN),
                "generate",
                "--url",
                f"127.0.0.1:{grpc}",
                "--prompt",
                "a cat",
                "--steps",
                "3",
                "--width",
                "64",
                "--height",
                "64",
                "--controlnet",
                f"edges={hint}:0.8",
                "--lora",
                "ink_kohya:0.5",
                "--lora-bound-k",
                "1",
                "-o",
                str(tmp_path / "adapters.png"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert adapters.returncode == 0, adapters.stderr
        assert "LoRAs landed at step" in adapters.stdout

        bad = subprocess.run(
            [
                str(BIN),
                "generate",
                "--url",
                f"127.0.0.1:{grpc}",
                "--prompt",
                "x",
                "--steps",
                "0",
                "-o",
                str(tmp_path / "bad.png"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert bad.returncode == 2 and "STEPS" in bad.stderr

        previews = tmp_path / "previews"
        streamed = subprocess.run(
            [
                *(str(BIN), "generate", "--url", f"127.0.0.1:{grpc}", "--prompt", "a photo of a cat", "--seed", "-1"),
                *("--steps", "4", "--scheduler", "Euler a", "--preview-dir", str(previews), "-o", str(out)),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert streamed.returncode == 0, streamed.stderr
        seed = int(re.search(r"seed (\d+)", streamed.stdout).group(1))
        assert sorted(p.name for p in previews.iterdir()) == [f"step_{i:03d}.png" for i in (1, 2, 3)]
        assert np.asarray(Image.open(previews / "step_001.png")).shape == (64, 64, 3)  # upscaled from 8x8
        expected = reference(GenerationRequest(prompt="a photo of a cat", seed=seed, steps=4, scheduler="euler_a"))
        assert np.abs(np.asarray(Image.open(out)).astype(int) - expected).max() <= 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    assert proc.returncode == 0
    assert not alive(server_pid)
    assert not [p for p in stubs if alive(p)], "orphaned stub processes"
    assert not [p for p in shm if p.exists()], "leaked /dev/shm regions"


def test_demo_prints_only_what_the_user_asked_for(model_dir, tmp_path):
    """The README's main job: a few lines (the server log goes to a file), the PNG written."""
    out = tmp_path / "demo.png"
    run = subprocess.run(
        [str(BIN), "demo", "--model-dir", str(model_dir), "--steps", "2", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert out.is_file() and f"wrote {out}" in run.stdout
    assert len(run.stdout.splitlines()) <= 5, run.stdout
    assert "CudaDriverHelper" not in run.stdout + run.stderr and "[transformers]" not in run.stdout + run.stderr


def test_a_bad_parameter_stops_serve_before_it_starts_naming_it(model_dir, capsys):
    from triton_backend.serving.cli import main

    assert main(["serve", "--model-dir", str(model_dir), "--set", "denoise.lora_bound_k=banana"]) == 2
    err = capsys.readouterr().err
    assert err == "error: denoise: parameter lora_bound_k='banana'; allowed: auto or an integer >= 0\n", err
    assert main(["serve", "--model-dir", str(model_dir), "--layout", "cpu", "--set", "unet.freeze=off"]) == 2
    assert "layout cpu renders no unet model" in capsys.readouterr().err
    assert main(["serve", "--model-dir", str(model_dir), "--vae", str(model_dir / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --vae ") and "not a diffusers AutoencoderKL directory" in err and err.count("\n") == 1


def test_a_bad_model_dir_is_one_line_with_the_fix(tmp_path, capsys):
    from triton_backend.serving.cli import main

    assert main(["serve", "--model-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model_index.json" in err and "leave it out" in err
