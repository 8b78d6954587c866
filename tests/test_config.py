from pathlib import Path

import pytest
import torch
from tritonclient.grpc import model_config_pb2

from triton_backend.config import StageConfig
from triton_backend.errors import ConfigError
from triton_backend.paths import model_repository_dir

REPO = model_repository_dir()


def _load_config(name, repo=REPO):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_baseline_takes_exactly_the_img2img_inputs():
    """The baseline's one model takes what ``txt2img`` and ``img2img`` take (``INIT_IMAGE`` makes it img2img)."""
    from triton_backend.paths import baseline_repository_dir

    ours = {(i.name, i.data_type, tuple(i.dims)) for i in _load_config("img2img").input}
    baseline = {(i.name, i.data_type, tuple(i.dims)) for i in _load_config("txt2img", baseline_repository_dir()).input}
    assert ours == baseline


def test_every_config_parses_and_has_a_model_py():
    names = sorted(p.parent.name for p in REPO.glob("*/config.pbtxt"))
    assert names == [
        "controlnet",
        "denoise",
        "img2img",
        "img2img_stream",
        "lora_manager",
        "text_encoder",
        "txt2img",
        "txt2img_stream",
        "unet",
        "vae",
    ]
    for name in names:
        config = _load_config(name)
        assert config.name == name
        if config.platform != "ensemble":
            assert config.backend == "python"
            assert (REPO / name / "1" / "model.py").is_file()


def test_the_public_models_take_the_request_and_call_the_same_stages():
    stream, txt2img = (_load_config(n) for n in ("txt2img_stream", "txt2img"))
    assert stream.model_transaction_policy.decoupled and not txt2img.model_transaction_policy.decoupled
    assert [(i.name, i.data_type, list(i.dims)) for i in stream.input] == [
        *((i.name, i.data_type, list(i.dims)) for i in txt2img.input),
        ("PREVIEW_EVERY", model_config_pb2.TYPE_INT32, [1]),
    ]
    assert {o.name for o in txt2img.output} < {o.name for o in stream.output}
    assert {k: v.string_value for k, v in stream.parameters.items()} == {
        k: v.string_value for k, v in txt2img.parameters.items()
    }


def test_each_stage_declares_what_the_public_models_send_it_and_returns_what_they_read():
    from triton_backend.schema import DENOISE_INPUTS, FIELDS, IMG2IMG_ONLY, TEXT_ENCODER_INPUTS, VAE_ENCODE_INPUTS
    from triton_backend.serving.public import Img2ImgModel, PublicModel
    from triton_backend.stages.denoise import IMAGE_TENSORS

    def names(model, kind="input"):
        return {t.name for t in getattr(_load_config(model), kind)}

    fields = {f.name for f in FIELDS}
    assert set(PublicModel.inputs) == fields - set(IMG2IMG_ONLY) == names("txt2img")
    assert set(Img2ImgModel.inputs) == fields == names("img2img")
    assert set(TEXT_ENCODER_INPUTS) <= names("text_encoder")
    assert {"PROMPT_EMBEDS", "POOLED_EMBEDS"} <= names("text_encoder", "output")
    sent = {*DENOISE_INPUTS, *IMAGE_TENSORS, "PROMPT_EMBEDS", "POOLED_EMBEDS", "PREVIEW_EVERY", "PROGRESS_ADDRESS"}
    assert sent <= names("denoise") and {"LATENTS", "LORA_LANDED_STEP"} <= names("denoise", "output")
    assert names("vae") == {"LATENTS", *VAE_ENCODE_INPUTS} and names("vae", "output") == {"IMAGES", *IMAGE_TENSORS}
    required = {i.name for m in ("text_encoder", "denoise", "vae") for i in _load_config(m).input if not i.optional}
    assert required <= sent


def test_public_contract_names_and_types():
    """The public inputs are the schema's fields, all declared optional (a missing PROMPT gets our error naming it)."""
    from triton_backend.schema import FIELDS, IMG2IMG_ONLY
    from triton_backend.serving.contract import TYPES

    txt2img = _load_config("txt2img")
    types = {i.name: (i.data_type, list(i.dims), i.optional) for i in txt2img.input}
    assert types == {
        f.name: (model_config_pb2.DataType.Value(TYPES[f.triton_dtype]), list(f.dims), True)
        for f in FIELDS
        if f.name not in IMG2IMG_ONLY
    }
    outputs = {o.name: o for o in txt2img.output}
    image, images = outputs["IMAGE"], outputs["IMAGES"]
    assert image.data_type == model_config_pb2.TYPE_UINT8 and list(image.dims) == [-1, -1, 3]
    assert images.data_type == model_config_pb2.TYPE_UINT8 and list(images.dims) == [-1, -1, -1, 3]
    assert outputs["LORA_LANDED_STEP"].data_type == model_config_pb2.TYPE_INT32


def test_stage_config_from_params(model_dir):
    cfg = StageConfig.from_params(
        "denoise", {"model_dir": str(model_dir), "max_steps": "30", "unet_model": "unet_b"}, instance_count=2
    )
    assert cfg.device == torch.device("cpu") and cfg.dtype == torch.float32
    assert cfg.limits.max_steps == 30
    assert cfg.stage("unet") == "unet_b" and cfg.stage("vae") == "vae"
    assert cfg.num_threads >= 1


def test_model_dir_from_environment(model_dir, monkeypatch):
    monkeypatch.setenv("SWIFTDIFFUSION_MODEL_DIR", str(model_dir))
    assert StageConfig.from_params("vae", {}).model_dir == Path(model_dir)


@pytest.mark.parametrize(
    "params,needle",
    [
        ({"dtype": "float8"}, "dtype"),
        ({"max_steps": "many"}, "max_steps"),
        ({"max_steps": "0"}, "max_steps"),
        ({"model_dir": "/nonexistent/model"}, "model_dir"),
    ],
)
def test_bad_parameters_fail_the_load_naming_them(model_dir, params, needle):
    with pytest.raises(ConfigError, match=needle):
        StageConfig.from_params("denoise", {"model_dir": str(model_dir), **params})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_gpu_kind_without_cuda_fails_clearly(model_dir):
    with pytest.raises(ConfigError, match="KIND_GPU"):
        StageConfig.from_params("unet", {"model_dir": str(model_dir)}, kind="GPU")


def test_instance_count_reads_the_unet_config(tmp_path):
    from triton_backend.config import instance_count, read_model_config

    def count(text: str) -> int:
        (tmp_path / "config.pbtxt").write_text(f'name: "x"\nbackend: "python"\n{text}\n')
        return instance_count(read_model_config(tmp_path / "config.pbtxt"))

    # CPU defaults: one UNet instance with every core; one denoise instance drives every generation.
    assert instance_count(read_model_config(REPO / "unet" / "config.pbtxt")) == 1
    assert instance_count(read_model_config(REPO / "denoise" / "config.pbtxt")) == 1
    assert count("") == 1
    assert (
        count("instance_group [ { count: 1 kind: KIND_GPU gpus: [ 0 ] }, { count: 1 kind: KIND_GPU gpus: [ 1 ] } ]")
        == 2
    )
    assert count("instance_group [ { count: 2 kind: KIND_CPU } ]") == 2


def test_read_model_config_names_the_file(tmp_path):
    from triton_backend.config import read_model_config

    with pytest.raises(ConfigError, match="cannot read"):
        read_model_config(tmp_path / "missing.pbtxt")
    (tmp_path / "config.pbtxt").write_text('name: "x"\nmax_batch_size: [\n')
    with pytest.raises(ConfigError, match=r"config\.pbtxt"):
        read_model_config(tmp_path / "config.pbtxt")
    unet = read_model_config(REPO / "unet" / "config.pbtxt")
    assert unet["max_batch_size"] == 16 and "dynamic_batching" in unet
    assert unet["instance_group"][0]["kind"] == "KIND_CPU"


def test_architecture_is_read_from_the_model_config(model_dir, sdxl_model_dir):
    from triton_backend.model_info import ModelInfo

    sd, xl = ModelInfo.read(model_dir), ModelInfo.read(sdxl_model_dir)
    assert (sd.arch, sd.pooled_dim, sd.force_zeros_for_empty_prompt) == ("sd", 0, False)
    assert (xl.arch, xl.pooled_dim, xl.force_zeros_for_empty_prompt) == ("sdxl", 24, True)
    assert xl.cross_attention_dim == 32 + 48  # both text encoders' hidden states, concatenated


def _edited_copy(src, dst, part, **changes):
    import json
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((dst / part / "config.json").read_text())
    config.update(changes)
    (dst / part / "config.json").write_text(json.dumps(config))
    return dst


def test_unsupported_architectures_are_refused_clearly(model_dir, sdxl_model_dir, tmp_path):
    import shutil

    from triton_backend.model_info import ModelInfo

    refiner = _edited_copy(sdxl_model_dir, tmp_path / "refiner", "unet")
    shutil.rmtree(refiner / "text_encoder")
    with pytest.raises(ConfigError, match=r"text_encoder_2.*refiner"):
        ModelInfo.read(refiner)
    other = _edited_copy(model_dir, tmp_path / "other", "unet", addition_embed_type="image")
    with pytest.raises(ConfigError, match="addition_embed_type='image'"):
        ModelInfo.read(other)
    wrong = _edited_copy(sdxl_model_dir, tmp_path / "wrong", "unet", projection_class_embeddings_input_dim=99)
    with pytest.raises(ConfigError, match="projection_class_embeddings_input_dim=99"):
        ModelInfo.read(wrong)


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"max_active": "zero"}, "max_active='zero'; allowed: auto or an integer >= 1"),
        ({"max_active": "0"}, "max_active='0'; allowed: auto or an integer >= 1"),
        ({"max_pending": "-1"}, "max_pending='-1'; allowed: an integer >= 1"),
        ({"default_deadline_ms": "soon"}, "default_deadline_ms"),
        ({"late_policy": "drop"}, "late_policy='drop'; allowed: serve, reject"),
    ],
)
def test_bad_scheduler_parameters_fail_the_denoise_load_naming_them(model_dir, params, needle):
    from triton_backend.stages.denoise import Denoiser

    with pytest.raises(ConfigError, match=needle):
        Denoiser(StageConfig.from_params("denoise", {"model_dir": str(model_dir), **params}))


def test_scheduler_parameters_reach_the_policy(model_dir):
    from triton_backend.stages.denoise import Denoiser

    params = {"max_active": "3", "max_pending": "5", "default_deadline_ms": "2500", "late_policy": "reject"}
    scheduler = Denoiser(StageConfig.from_params("denoise", {"model_dir": str(model_dir), **params})).scheduler
    assert scheduler.policy.concurrency.limit == 3 and scheduler.policy.concurrency.fixed == 3
    assert (scheduler.max_pending, scheduler.default_deadline_ms, scheduler.late_policy) == (5, 2500, "reject")
