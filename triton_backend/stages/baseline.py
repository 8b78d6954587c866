"""The baseline: the stock diffusers pipeline inside one Triton Python model, with adapters used the stock way.

This is how Triton's Stable Diffusion tutorial and PyTriton's diffusion example serve diffusers, extended with the
stock adapter path: ``StableDiffusionControlNetPipeline`` (``MultiControlNetModel`` for several; the ``XL``
pipelines for SDXL models, without the invisible watermark) and, per request,
``load_lora_weights`` + ``set_adapters`` + ``fuse_lora``, then ``unfuse_lora`` + ``unload_lora_weights``. It takes the
same inputs as ``txt2img`` and ``img2img`` (same client, same perf_analyzer data), parsed by the same schema: with
``INIT_IMAGE`` the ``...Img2ImgPipeline`` (``MASK_IMAGE``: ``...InpaintPipeline``) of the same components, and
``NUM_IMAGES`` as ``num_images_per_prompt`` with one generator (the stock call).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..config import StageConfig
from ..controlnet.service import controlnet_names
from ..errors import InvalidRequestError, NotFoundError
from ..lora.store import resolve_lora_path
from ..model_info import ModelInfo
from ..paths import controlnet_dir, lora_dir
from ..schedulers import make_scheduler
from ..schema import GenerationRequest, field_names, parse_request, reject_sdxl_only


class BaselinePipeline:
    """One diffusers pipeline per model instance; requests run one at a time (as the stock examples do)."""

    def __init__(self, cfg: StageConfig):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        self.cfg = cfg
        self.sdxl = ModelInfo.read(cfg.model_dir).is_sdxl
        if self.sdxl:
            pipe = StableDiffusionXLPipeline.from_pretrained(
                str(cfg.model_dir), torch_dtype=cfg.dtype, add_watermarker=False
            )
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                str(cfg.model_dir), torch_dtype=cfg.dtype, safety_checker=None, requires_safety_checker=False
            )
        self.pipe = pipe.to(cfg.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.base_scheduler = self.pipe.scheduler
        self.lora_dir = lora_dir(cfg.params, cfg.model_dir)
        self.controlnet_dir = controlnet_dir(cfg.params, cfg.model_dir)
        self.controlnets: dict[str, torch.nn.Module] = {}

    def _controlnet(self, name: str) -> torch.nn.Module:
        from diffusers import ControlNetModel

        if name not in self.controlnets:
            path = self.controlnet_dir / name
            if not (path / "config.json").is_file():
                raise NotFoundError("CONTROLNET_NAMES", name, controlnet_names(self.controlnet_dir))
            model = ControlNetModel.from_pretrained(str(path), torch_dtype=self.cfg.dtype)
            self.controlnets[name] = model.to(self.cfg.device)
        return self.controlnets[name]

    def pipeline_class(self, req: GenerationRequest) -> type:
        """The stock pipeline of a request: ``StableDiffusion[XL][ControlNet][Img2Img|Inpaint]Pipeline``."""
        import diffusers

        kind = "" if req.init_image is None else "Inpaint" if req.mask_image is not None else "Img2Img"
        xl, controlnet = "XL" if self.sdxl else "", "ControlNet" if req.controlnet_names else ""
        return getattr(diffusers, f"StableDiffusion{xl}{controlnet}{kind}Pipeline")

    @torch.inference_mode()
    def handle(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from diffusers import MultiControlNetModel
        from PIL import Image

        req = parse_request(tensors, self.cfg.limits)
        if req.clip_skip != 1:  # (diffusers 0.42's clip_skip reads text_encoder.text_model: gone in transformers 5)
            raise InvalidRequestError("CLIP_SKIP", "the stock pipeline's clip_skip fails with transformers 5")
        pipe = self.pipe
        kwargs: dict = {"num_images_per_prompt": req.num_images}
        hint_key = "image"
        if req.init_image is not None:
            kwargs["image"] = Image.fromarray(req.init_image)
            kwargs["height"], kwargs["width"] = req.init_image.shape[:2]
            hint_key = "control_image"
            if req.strength is not None:
                kwargs["strength"] = req.strength
            if req.mask_image is not None:
                kwargs["mask_image"] = Image.fromarray(req.mask_image)
        else:
            kwargs["height"], kwargs["width"] = req.height or None, req.width or None
        if self.sdxl:
            kwargs |= {
                "prompt_2": req.prompt_2,
                "negative_prompt_2": req.negative_prompt_2,
                "original_size": tuple(req.original_size) or None,
                "crops_coords_top_left": tuple(req.crops_coords_top_left) or (0, 0),
                "target_size": tuple(req.target_size) or None,
            }
        else:
            reject_sdxl_only(req, "SD1.x/2.x")
        extra: dict[str, Any] = {"add_watermarker": False} if self.sdxl else {}
        if req.controlnet_names:
            nets = [self._controlnet(n) for n in req.controlnet_names]
            images = req.controlnet_images
            if images is None:
                raise InvalidRequestError("CONTROLNET_IMAGES", "required with CONTROLNET_NAMES")
            one = len(nets) == 1
            extra["controlnet"] = nets[0] if one else MultiControlNetModel(nets)
            pil = [Image.fromarray(img) for img in images]
            cn = req.controlnets
            kwargs |= {
                hint_key: pil[0] if one else pil,
                "controlnet_conditioning_scale": cn[0][1] if one else [c[1] for c in cn],
                "control_guidance_start": cn[0][2] if one else [c[2] for c in cn],
                "control_guidance_end": cn[0][3] if one else [c[3] for c in cn],
            }
        if req.controlnet_names or req.init_image is not None:
            pipe = self.pipeline_class(req)(**self.pipe.components, **extra)
            pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = make_scheduler(req.scheduler, self.base_scheduler, seed=req.seed)
        names = [n for n, _ in req.loras]
        try:
            for name in names:
                pipe.load_lora_weights(str(resolve_lora_path(self.lora_dir, name)), adapter_name=name)
            if names:
                pipe.set_adapters(names, adapter_weights=[s for _, s in req.loras])
                pipe.fuse_lora(adapter_names=names)
            images = pipe(
                req.prompt,
                negative_prompt=req.negative_prompt,
                num_inference_steps=req.steps,
                guidance_scale=req.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(req.seed),
                output_type="np",
                **kwargs,
            ).images
        finally:
            if names:
                pipe.unfuse_lora()
                pipe.unload_lora_weights()
        images = (images * 255).round().astype(np.uint8)
        return {
            "IMAGE": images[0],
            "IMAGES": images,
            "LORA_LANDED_STEP": np.array([0 if names else -1], dtype=np.int32),
        }


#: The baseline model reads every ``txt2img`` and ``img2img`` input.
INPUTS = tuple(field_names())
