"""The ``swiftdiffusion`` command: ``default-model``, ``convert``, ``serve``, ``repository``, ``tritonserver``,
``generate``, ``demo`` and ``perf-analyzer``.

``serve [OPTIONS] -- ARGS``: everything after ``--`` is passed to ``tritonserver`` unchanged (e.g. mutual TLS,
``--grpc-use-ssl-mutual=true --grpc-root-cert=ca.pem``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ..paths import cache_dir, default_model_dir
from ..tools.convert import CHECKPOINT_SUFFIXES

#: Environment variable read for ``serve --admin-key`` (keeps the key off the command line of ``serve``).
ADMIN_KEY_ENV = "SWIFTDIFFUSION_ADMIN_KEY"


def _convert(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..tools.convert import convert_checkpoint

    try:
        out = convert_checkpoint(
            Path(args.checkpoint), Path(args.out), args.arch, Path(args.config) if args.config else None
        )
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    print(f"converted {args.checkpoint} to {out} (serve it with: swiftdiffusion serve --model-dir {out})")
    return 0


def _default_model(args: argparse.Namespace) -> int:
    from ..tools.default_model import write_default_model

    if args.out is None:
        args.out = str(default_model_dir(args.arch, args.preset, args.inpainting))
    try:
        path = write_default_model(
            args.out, force=args.force, preset=args.preset, arch=args.arch, inpainting=args.inpainting
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"default model written to {path}")
    return 0


class UsageError(Exception):
    """A command-line mistake: printed as one line (``error: ...``), exit code 2."""


def _ensure_model_dir(model_dir: str | None, arch: str = "sd1") -> Path:
    """An explicit ``--model-dir`` is used as is (a single-file checkpoint is converted once into the cache);
    otherwise the default model of ``arch`` is generated if missing.
    """
    if model_dir and Path(model_dir).is_file() and Path(model_dir).suffix in CHECKPOINT_SUFFIXES:
        from ..errors import ConfigError
        from ..tools.convert import converted_model_dir

        print(f"converting {model_dir} (once; kept in the cache) ...", flush=True)
        try:
            return converted_model_dir(Path(model_dir))
        except ConfigError as exc:
            raise UsageError(
                f"{exc}; or convert it with: swiftdiffusion convert CHECKPOINT --out DIR --arch ..."
            ) from None
    if model_dir:
        if not (Path(model_dir) / "model_index.json").is_file():
            raise UsageError(
                f"--model-dir {model_dir}: not a diffusers model directory (no model_index.json); point it at one, or "
                "leave it out to use the generated default model"
            )
        return Path(model_dir)
    from ..tools.default_model import write_default_model

    return write_default_model(default_model_dir(arch), arch=arch)


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """The ``--set MODEL.PARAMETER=VALUE`` flags (a malformed one is a :class:`UsageError`)."""
    from .repository import parse_overrides

    try:
        overrides = parse_overrides(getattr(args, "set", None) or [])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if getattr(args, "vae", None):  # --vae DIR: the vae stage's vae_dir
        vae_dir = Path(args.vae).expanduser().resolve()
        if not (vae_dir / "config.json").is_file():
            raise UsageError(f"--vae {args.vae}: not a diffusers AutoencoderKL directory (no config.json)")
        overrides.setdefault("vae", {})["vae_dir"] = str(vae_dir)
    return overrides


def _server_from_args(args: argparse.Namespace):
    """The server of ``serve`` and ``demo``: the repository rendered for one pipeline ``txt2img`` (the templates'
    names, no prefix) on the model, unless ``--model-repository`` names one.
    """
    import atexit
    import shutil
    import tempfile

    from .repository import Pipeline, render
    from .server import TritonServer

    model_dir = _ensure_model_dir(args.model_dir, args.arch).resolve()
    kwargs = dict(
        model_dir=model_dir,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        log_file=Path(args.log_file) if args.log_file else None,
    )
    if args.model_repository:
        kwargs["model_repository"] = Path(args.model_repository)
    else:
        out = Path(tempfile.mkdtemp(prefix="swiftdiffusion-repo-"))
        atexit.register(shutil.rmtree, out, True)  # a few config files; gone when this command exits
        try:
            layout = _layout(args)
            if args.command == "serve":
                auto = f" (auto: {_gpus_seen()})" if args.layout == "auto" else ""
                print(f"layout {layout.name}{auto}: {LAYOUT_MODELS[layout.folded]}", flush=True)
            kwargs["model_repository"] = render(
                out,
                [Pipeline("txt2img", model_dir)],
                layout,
                stage_prefix="",
                load_stages=False,
                streaming=not getattr(args, "no_stream", False),
                overrides=_overrides(args),
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if getattr(args, "tls_cert", None) or getattr(args, "tls_key", None):
        kwargs["tls_cert"] = Path(args.tls_cert) if args.tls_cert else None
        kwargs["tls_key"] = Path(args.tls_key) if args.tls_key else None
    if getattr(args, "admin_key", None):
        kwargs["admin_key"] = args.admin_key
    kwargs["extra_args"] = list(getattr(args, "tritonserver_args", []))
    return TritonServer(**kwargs)


def _gpus_seen() -> str:
    from .repository import visible_gpus

    n = visible_gpus()
    return "no GPU" if n == 0 else f"{n} GPU{'s' if n > 1 else ''}"


def _layout(args: argparse.Namespace):
    """``--layout``: a name, or ``auto`` (``serve``): ``cpu`` without a GPU, else the GPU layout for the GPUs seen."""
    from .repository import Layout, visible_gpus

    dtype = getattr(args, "dtype", "auto")
    return Layout.auto(visible_gpus(), dtype) if args.layout == "auto" else Layout.named(args.layout, dtype)


def _log_to_file(args: argparse.Namespace) -> None:
    """Unless ``--log-file`` or ``--verbose``: Triton's log (~120 lines at start, CUDA probes included) goes to
    ``~/.cache/swiftdiffusion/logs/<command>-server.log``, emptied first; the terminal shows our status lines.
    """
    if args.log_file or args.verbose:
        return
    log = cache_dir() / "logs" / f"{args.command}-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    args.log_file = str(log)


def _serve(args: argparse.Namespace) -> int:
    _log_to_file(args)
    server = _server_from_args(args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"loading {server.model_dir} ... (server log: {args.log_file or 'below'})", flush=True)
    from .server import ServerError

    start = time.monotonic()
    try:
        server.start(timeout=args.ready_timeout)
    except ServerError as exc:
        print(f"error: {exc} (server log: {args.log_file or 'above'})", file=sys.stderr)
        return 1
    from .watchdog import public_models

    with contextlib.closing(server.client()) as client:
        models = ", ".join(public_models(client, server.admin_headers))
    print(
        f"ready in {time.monotonic() - start:.0f}s: {models}\n"
        f"  gRPC:    {server.grpc_url}\n  HTTP:    {server.http_url}\n  metrics: {server.metrics_url}\n"
        "Ctrl-C to stop.",
        flush=True,
    )
    try:
        while not stop.wait(0.5):
            if server.process is None or server.process.poll() is not None:
                print("tritonserver exited unexpectedly", file=sys.stderr)
                return 1
    finally:
        print(f"stopping: finishing requests in flight (up to {args.grace:g}s) ...", flush=True)
        server.stop(grace_s=args.grace)
    return 0


def _repository(args: argparse.Namespace) -> int:
    from .repository import Pipeline, render, rendered_names, stage_names

    try:
        pipelines = [Pipeline.parse(spec) for spec in args.pipeline]
        layout = _layout(args)
        if args.k8s:
            from .k8s import render_split

            for path in render_split(Path(args.out), pipelines, layout, args.image, args.weights_claim):
                print(f"wrote {path}")
            return 0
        out = render(
            Path(args.out),
            pipelines,
            layout,
            stage_prefix=args.stage_prefix,
            share_adapters=args.share_adapters,
            streaming=not args.no_stream,
            overrides=_overrides(args),
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rendered = rendered_names(out)
    for p in pipelines:
        stages = [n for n in stage_names(p.name, args.stage_prefix).values() if n != p.name and n in rendered]
        print(f"{p.name}: {p.model_dir}\n  stages: {' '.join(stages)}")
    print(
        f"wrote {out}\nrun it: swiftdiffusion tritonserver --model-repository={out} (any tritonserver flags), or "
        "tritonserver in the NGC container with this package installed"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The README's main job: start the server on the model, send one gRPC request, write a PNG, stop."""
    from PIL import Image
    from swiftdiffusion_client import Client, GenerationRequest
    from swiftdiffusion_client.cli import stream_with_progress

    from .server import ServerError

    args.grpc_port = args.http_port = args.metrics_port = 0
    _log_to_file(args)
    print(f"starting tritonserver (log: {args.log_file or 'below'}) ...", flush=True)
    server = _server_from_args(args)
    try:
        server.start()
    except ServerError as exc:
        print(f"error: {exc} (see {args.log_file})", file=sys.stderr)
        return 1
    with server:
        print(f"server ready on {server.grpc_url}", flush=True)
        request = GenerationRequest(prompt=args.prompt, seed=args.seed, steps=args.steps)
        with Client(server.grpc_url) as client:
            start = time.perf_counter()
            if sys.stderr.isatty():  # a progress bar: the streaming model, the same image
                image = stream_with_progress(client, request, None, show=True).image
            else:
                image = client.generate(request)
            elapsed = time.perf_counter() - start
    Image.fromarray(image).save(args.output)
    print(f"wrote {args.output} ({image.shape[1]}x{image.shape[0]}, {request.steps} steps) in {elapsed:.3f}s")
    return 0


NO_STREAM_HELP = "leave out the streaming model (NAME_stream): one process (~40 MB, no torch) less per pipeline"
SET_HELP = (
    "set a config parameter of a rendered model, e.g. denoise.lora_bound_k=0 (repeatable; docs/parameters.md); a "
    "bad value stops before anything starts, naming it"
)
#: What ``serve`` says it runs: folded (the cpu layout) or not.
LAYOUT_MODELS = {
    True: "txt2img, img2img -> text_encoder, denoise (UNet, ControlNets), vae; lora_manager",
    False: "txt2img, img2img -> text_encoder, denoise -> unet -> controlnet, vae; lora_manager",
}
LAYOUT_HELP = (
    "cpu: denoise runs the UNet and the ControlNets (no unet or controlnet model); split: every stage its own "
    "model, on CPU instances (the bundled repository); 1gpu, 2gpu, 2gpu+1c, 2gpu+2c: the split on GPUs"
)


def _add_server_args(p: argparse.ArgumentParser, ports: bool = True) -> None:
    from .repository import LAYOUT_NAMES

    p.add_argument(
        "--model-dir",
        default=None,
        help="diffusers SD1.x/2.x or SDXL model directory, architecture read from its config "
        "(default: the generated default model of --arch)",
    )
    p.add_argument("--arch", default="sd1", choices=["sd1", "sdxl"], help="architecture of the generated default model")
    p.add_argument("--model-repository", default=None, help="Triton model repository (default: the bundled one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument("--log-file", default=None, help="write Triton's log here (default ~/.cache/swiftdiffusion/logs/)")
    p.add_argument("--verbose", action="store_true", help="stream Triton's log to the terminal instead of a file")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for all models to load")
    p.add_argument(
        "--layout",
        default="auto",
        choices=["auto", *LAYOUT_NAMES],
        help=LAYOUT_HELP + "; auto (default): cpu without a GPU, else the GPU layout for the GPUs seen",
    )
    p.add_argument("--dtype", default="auto", help="dtype of the model stages on GPUs (auto = float16)")
    p.add_argument(
        "--vae",
        default=None,
        metavar="DIR",
        help="a replacement VAE: a diffusers AutoencoderKL directory of the same latent space (e.g. SDXL's fp16-fix)",
    )
    if ports:
        p.add_argument("--grpc-port", type=int, default=8001, help="0 = any free port")
        p.add_argument("--http-port", type=int, default=8000, help="0 = any free port")
        p.add_argument("--metrics-port", type=int, default=8002, help="0 = any free port")


def build_parser() -> argparse.ArgumentParser:
    from swiftdiffusion_client import cli as client_cli

    from ..tools.default_model import ARCHS, PRESETS, SDXL_PRESETS
    from .repository import LAYOUT_NAMES
    from .server import ADMIN_HEADER, DEFAULT_GRACE_S

    parser = argparse.ArgumentParser(prog="swiftdiffusion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "convert", help="convert a single-file .safetensors checkpoint (original layout) to a diffusers directory"
    )
    p.add_argument("checkpoint", help="the .safetensors file (SD1.x or SDXL, as A1111 and civitai ship them)")
    p.add_argument("--out", required=True, help="the diffusers directory to write")
    p.add_argument("--arch", default=None, choices=["sd1", "sdxl"], help="default: told from the checkpoint's keys")
    p.add_argument(
        "--config",
        default=None,
        help="a diffusers directory of the same architecture for its configs and tokenizers (default: the generated "
        "default model of --arch, which fits only checkpoints written from it)",
    )
    p.set_defaults(func=_convert)

    p = sub.add_parser("default-model", help="write the small deterministic random-weight default model")
    p.add_argument("--out", default=None, help=f"output directory (default {default_model_dir()}[-sdxl])")
    p.add_argument("--force", action="store_true", help="rewrite even if the directory is current")
    p.add_argument(
        "--arch",
        default="sd1",
        choices=list(ARCHS),
        help="sd1: Stable Diffusion 1.x architecture; sdxl: SDXL (two text encoders, text_time conditioning)",
    )
    p.add_argument(
        "--preset",
        default="tiny",
        choices=sorted({*PRESETS, *SDXL_PRESETS}),
        help="tiny: tests; cpu: CPU benchmarks; sd15 (sd1 only): full SD1.5 architecture (GPU benchmarks)",
    )
    p.add_argument(
        "--inpainting",
        action="store_true",
        help="a 9-channel inpainting UNet (img2img with --mask), as the SD/SDXL inpainting checkpoints",
    )
    p.set_defaults(func=_default_model)

    p = sub.add_parser("serve", help="run the bundled tritonserver on the model repository")
    _add_server_args(p)
    p.add_argument("--no-stream", action="store_true", help=NO_STREAM_HELP)
    p.add_argument("--set", action="append", default=[], metavar="MODEL.PARAMETER=VALUE", help=SET_HELP)
    p.add_argument("--tls-cert", default=None, help="PEM certificate: serve gRPC over TLS (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument(
        "--admin-key",
        default=os.environ.get(ADMIN_KEY_ENV),
        help=f"key of the restricted APIs (model load/unload, shared-memory registration, trace, logging), sent by "
        f"clients as header '{ADMIN_HEADER}' (default: ${ADMIN_KEY_ENV}, else random: nobody but this launcher)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE_S,
        help="on SIGTERM/Ctrl-C, seconds to let requests in flight finish while new ones are refused "
        "(default %(default)s)",
    )
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "repository", help="render a self-contained model repository: pipelines NAME=MODEL_DIR, device layout"
    )
    p.add_argument("--out", required=True, help="the repository to write (models already there are kept)")
    p.add_argument(
        "--pipeline",
        action="append",
        required=True,
        metavar="NAME=MODEL_DIR",
        help="a pipeline: public model NAME, stages NAME_text_encoder, NAME_unet, ... (repeat for more)",
    )
    p.add_argument("--layout", default="split", choices=LAYOUT_NAMES, help=LAYOUT_HELP + " (default %(default)s)")
    p.add_argument("--dtype", default="auto", help="dtype of the model stages on GPUs (auto = float16)")
    p.add_argument("--stage-prefix", default=None, help="stage name prefix (default NAME_; '' = no prefix)")
    p.add_argument(
        "--share-adapters",
        action="store_true",
        help="pipelines of one architecture share one ControlNet service and one LoRA manager",
    )
    p.add_argument("--no-stream", action="store_true", help=NO_STREAM_HELP)
    p.add_argument("--set", action="append", default=[], metavar="MODEL.PARAMETER=VALUE", help=SET_HELP)
    p.add_argument(
        "--k8s",
        action="store_true",
        help="split deployment: OUT/repositories/{pipeline,controlnet} + OUT/k8s/swiftdiffusion.yaml",
    )
    p.add_argument("--image", default="my-registry/tritonserver-swiftdiffusion:24.10", help="--k8s: server image")
    p.add_argument("--weights-claim", default="model-weights", help="--k8s: PersistentVolumeClaim of the weights")
    p.set_defaults(func=_repository)

    sub.add_parser(
        "tritonserver",
        help="run the bundled tritonserver with every argument passed through (a stock Triton with our backend)",
    )

    p = sub.add_parser("generate", help="send one txt2img request over gRPC and write a PNG")
    client_cli.add_arguments(p)
    p.set_defaults(func=client_cli.run)

    sub.add_parser(
        "perf-analyzer",
        help="run the perf_analyzer of tritonclient 2.51.0 with the libraries it needs; all arguments pass through",
    )

    p = sub.add_parser("demo", help="start a server, generate one image over gRPC, write it, stop")
    _add_server_args(p, ports=False)
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("-o", "--output", default="swiftdiffusion.png")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no library chatter before the lines that matter
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["perf-analyzer"]:  # every argument goes to perf_analyzer unchanged
        from .perf import run_perf_analyzer

        return run_perf_analyzer(argv[1:]).returncode
    if argv[:1] == ["tritonserver"]:  # every argument goes to tritonserver unchanged
        from .server import exec_tritonserver

        exec_tritonserver(argv[1:])
    passthrough: list[str] = []
    if argv[:1] == ["serve"] and "--" in argv:  # serve ... -- ARGS: ARGS go to tritonserver as they are
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    args.tritonserver_args = passthrough
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
