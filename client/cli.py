"""``swiftdiffusion generate``: the gRPC client CLI (parses arguments, calls :class:`Client`, shows progress)."""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from pathlib import Path
from typing import TextIO

import numpy as np

from triton_backend.errors import InvalidRequestError
from triton_backend.schedulers import canonical_scheduler
from triton_backend.schema import GenerationRequest

from .client import Client, ClientError, GenerationResult


def scheduler_name(text: str) -> str:
    """``--scheduler``: the table name of ``text`` (argparse prints the accepted names when it is unknown)."""
    try:
        return canonical_scheduler(text)
    except InvalidRequestError as exc:
        raise argparse.ArgumentTypeError(exc.reason) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``generate`` options; defaults are the schema's (omitted fields use the server-side defaults)."""
    d = GenerationRequest(prompt="")
    parser.add_argument("--url", default="127.0.0.1:8001", help="gRPC endpoint HOST:PORT (default %(default)s)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--prompt-2", default=None, help="SDXL: the second text encoder's prompt (default --prompt)")
    parser.add_argument("--negative-prompt-2", default=None, help="SDXL: default --negative-prompt")
    parser.add_argument("--seed", type=int, default=d.seed, help="-1 = a random seed (printed)")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--guidance-scale", type=float, default=d.guidance_scale)
    parser.add_argument("--height", type=int, default=d.height, help="pixels; 0 = the model's native size")
    parser.add_argument("--width", type=int, default=d.width, help="pixels; 0 = the model's native size")
    parser.add_argument(
        "--scheduler",
        default=d.scheduler,
        type=scheduler_name,
        help="sampler: a name of the README's table or an A1111/ComfyUI spelling ('DPM++ 2M Karras', 'Euler a')",
    )
    parser.add_argument(
        "--lora", action="append", default=[], metavar="NAME[:SCALE]", help="apply a LoRA from the store (repeatable)"
    )
    parser.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="NAME=IMAGE[:SCALE]",
        help="condition on a hint image with a ControlNet from the store (repeatable); IMAGE is resized to the output",
    )
    parser.add_argument(
        "--lora-bound-k", type=int, default=None, help="step by which LoRAs must be patched (0 = first)"
    )
    for flag, names in (
        ("--original-size", ("H", "W")),
        ("--crops-coords-top-left", ("TOP", "LEFT")),
        ("--target-size", ("H", "W")),
    ):
        parser.add_argument(
            flag, type=int, nargs=2, default=(), metavar=names, help="SDXL micro-conditioning (SDXL models only)"
        )
    parser.add_argument(
        "--init-image",
        default=None,
        metavar="PATH",
        help="img2img: start from this image (resized to --width/--height when given, else cut to a multiple of 8)",
    )
    parser.add_argument(
        "--strength", type=float, default=None, help="img2img: how much to repaint, in (0, 1] (default the pipeline's)"
    )
    parser.add_argument(
        "--mask", default=None, metavar="PATH", help="inpainting (with --init-image): white = repaint, black = keep"
    )
    parser.add_argument(
        "--num-images", type=int, default=1, help="images per request, seeded SEED, SEED+1, ... (-o x.png: x-0.png ...)"
    )
    parser.add_argument(
        "--clip-skip", type=int, default=1, help="A1111's Clip skip: 1 = the text encoder's last layer, 2 = penultimate"
    )
    parser.add_argument("--timeout", type=float, default=None, help="client timeout in seconds")
    parser.add_argument("--tls-root-cert", default=None, help="PEM file to verify a server that uses TLS")
    parser.add_argument("-o", "--output", default="out.png", help="PNG file to write (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (plain txt2img request)")
    parser.add_argument(
        "--preview-dir", default=None, help="write a preview every ~10%% of the steps here (step_NNN.png)"
    )


def parse_lora(spec: str) -> tuple[str, float]:
    """``NAME[:SCALE]`` → ``(name, scale)``; a bad scale is an argparse error."""
    name, _, scale = spec.partition(":")
    try:
        return name, float(scale) if scale else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora {spec!r}: SCALE must be a number") from None


def parse_controlnet(spec: str) -> tuple[str, str, float]:
    """``NAME=IMAGE[:SCALE]`` → ``(name, image path, scale)``."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"--controlnet {spec!r}: expected NAME=IMAGE[:SCALE]")
    path, _, scale = rest.rpartition(":") if rest.rpartition(":")[0] else (rest, "", "")
    try:
        return name, path, float(scale) if scale else 1.0
    except ValueError:
        return name, rest, 1.0  # a ':' that is part of the path


def load_hints(specs: list[tuple[str, str, float]], width: int, height: int) -> np.ndarray:
    """Hint images as ``[n, H, W, 3]`` uint8 at the output size (resized with PIL if needed)."""
    from PIL import Image

    images = []
    for _, path, _ in specs:
        try:
            image = Image.open(path).convert("RGB")
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"--controlnet: cannot read {path}: {exc}") from None
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        images.append(np.asarray(image, dtype=np.uint8))
    return np.stack(images)


def load_image(flag: str, path: str, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """``--init-image`` (``RGB``) / ``--mask`` (``L``) as uint8, at ``size`` (width, height) when given, else cut
    down to a multiple of 8 (the VAE's factor).
    """
    from PIL import Image

    try:
        image = Image.open(path).convert(mode)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{flag}: cannot read {path}: {exc}") from None
    width, height = size or (image.width // 8 * 8, image.height // 8 * 8)
    if not (width and height):
        raise argparse.ArgumentTypeError(f"{flag}: {path} is smaller than 8x8 pixels")
    if image.size != (width, height):
        resample = Image.Resampling.NEAREST if mode == "L" else Image.Resampling.LANCZOS
        image = image.resize((width, height), resample)
    return np.asarray(image, dtype=np.uint8)


def request_from_args(args: argparse.Namespace) -> GenerationRequest:
    loras = [parse_lora(s) for s in args.lora]
    controls = [parse_controlnet(s) for s in args.controlnet]
    init = mask = None
    if args.mask and not args.init_image:
        raise argparse.ArgumentTypeError("--mask needs --init-image (the image to inpaint)")
    if args.init_image:
        if bool(args.width) != bool(args.height):
            raise argparse.ArgumentTypeError("--init-image: give both --width and --height (to resize it), or neither")
        size = (args.width, args.height) if args.width and args.height else None
        init = load_image("--init-image", args.init_image, "RGB", size)
        args.height, args.width = init.shape[:2]
        if args.mask:
            mask = load_image("--mask", args.mask, "L", (args.width, args.height))
    hints = None
    if controls:
        if not (args.width and args.height):
            raise argparse.ArgumentTypeError("--controlnet needs --width and --height (the hint images' size)")
        hints = load_hints(controls, args.width, args.height)
    return GenerationRequest(
        init_image=init,
        mask_image=mask,
        strength=args.strength,
        num_images=args.num_images,
        clip_skip=args.clip_skip,
        controlnet_names=tuple(n for n, _, _ in controls),
        controlnet_images=hints,
        controlnet_scales=tuple(s for _, _, s in controls),
        lora_names=tuple(n for n, _ in loras),
        lora_scales=tuple(s for _, s in loras),
        lora_bound_k=args.lora_bound_k,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        prompt_2=args.prompt_2,
        negative_prompt_2=args.negative_prompt_2,
        seed=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        scheduler=args.scheduler,
        original_size=tuple(args.original_size),
        crops_coords_top_left=tuple(args.crops_coords_top_left),
        target_size=tuple(args.target_size),
    )


def random_seed() -> int:
    """``--seed -1``: a random seed (31 bits, as A1111 draws them), printed so the image can be made again."""
    return secrets.randbelow(2**31)


def stream_with_progress(
    client: Client, request: GenerationRequest, preview_dir: Path | None, show: bool, file: TextIO = sys.stderr
) -> GenerationResult:
    """Generate through the streaming model: a progress bar (steps, steps/s, ETA) on ``file`` when ``show``, and
    every preview written as ``<preview_dir>/step_NNN.png`` (upscaled to the image size, nearest neighbour).
    """
    from PIL import Image
    from tqdm import tqdm

    every = 0
    if preview_dir is not None:
        preview_dir.mkdir(parents=True, exist_ok=True)
        every = max(1, request.steps // 10)
    with tqdm(total=request.steps, unit="step", desc="generating", file=file, disable=not show, leave=False) as bar:
        for event in client.stream(request, preview_every=every):
            if isinstance(event, GenerationResult):
                return event
            if bar.total != event.total_steps:  # samplers with two UNet evaluations per step
                bar.total = event.total_steps
            bar.update(event.step - bar.n)
            if event.preview is not None and preview_dir is not None:
                h, w = event.preview.shape[:2]
                image = Image.fromarray(event.preview).resize((w * 8, h * 8), Image.Resampling.NEAREST)
                image.save(preview_dir / f"step_{event.step:03d}.png")
    raise ClientError("StatusCode.UNKNOWN", "the stream ended without an image")


def run(args: argparse.Namespace) -> int:
    """Send one request, write the PNG; exit code 0 on success, 2 on a rejected request, 1 otherwise.

    With a progress bar (a terminal, no ``--no-progress``) or ``--preview-dir``, the request goes to the streaming
    model (``txt2img_stream`` / ``img2img_stream``: the same images, one response per step) where the server has
    it; otherwise to ``txt2img`` / ``img2img`` (no bar).
    """
    from PIL import Image

    if args.seed == -1:
        args.seed = random_seed()
    try:
        request = request_from_args(args)
    except argparse.ArgumentTypeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    show = not args.no_progress and sys.stderr.isatty()
    preview_dir = Path(args.preview_dir) if args.preview_dir else None
    start = time.perf_counter()
    try:
        with Client(args.url, timeout_s=args.timeout, tls_root_cert=args.tls_root_cert) as client:
            stream = (show or preview_dir is not None) and client.can_stream(request)
            if preview_dir is not None and not stream:
                print(
                    f"error: --preview-dir needs the streaming model {client.model_for(request)}_stream, which "
                    f"{args.url} does not "
                    "serve (started with --no-stream?); leave --preview-dir out",
                    file=sys.stderr,
                )
                return 2
            result = stream_with_progress(client, request, preview_dir, show) if stream else client.run(request)
    except ClientError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2 if exc.status == "StatusCode.INVALID_ARGUMENT" else 1
    paths = output_paths(args.output, len(result.images))
    for path, image in zip(paths, result.images, strict=True):
        Image.fromarray(image).save(path)
    landed = f", LoRAs landed at step {result.lora_landed_step}" if request.lora_names else ""
    previews = f", previews in {preview_dir}" if preview_dir is not None else ""
    seeds = f"seeds {request.seed}..{request.seed + len(paths) - 1}" if len(paths) > 1 else f"seed {request.seed}"
    wrote = paths[0] if len(paths) == 1 else f"{paths[0]} .. {paths[-1]}"
    height, width = result.image.shape[:2]
    print(f"wrote {wrote} ({width}x{height}, {seeds}) in {time.perf_counter() - start:.2f}s{landed}{previews}")
    return 0


def output_paths(output: str, n: int) -> list[str]:
    """``-o cat.png`` for one image; ``cat-0.png`` .. ``cat-<n-1>.png`` for n (image i has seed SEED + i)."""
    if n == 1:
        return [output]
    path = Path(output)
    return [str(path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}")) for i in range(n)]


def one_line(exc: ClientError) -> str:
    """The server's message on one line, with the fix for the errors a user can act on."""
    message = " ".join(exc.message.split())
    if exc.status == "StatusCode.UNAVAILABLE" and "failed to connect" in message.lower():
        return f"{message} (is the server running? start it with: swiftdiffusion serve)"
    return message
