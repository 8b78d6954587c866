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


def test_baseline_takes_exactly_the_txt2img_inputs():
    from triton_backend.paths import baseline_repository_dir

    ours = {(i.name, i.data_type, tuple(i.dims)) for i in _load_config("txt2img").input}
    baseline = {(i.name, i.data_type, tuple(i.dims)) for i in _load_config("txt2img", baseline_repository_dir()).input}
    assert ours == baseline


def test_every_config_parses_and_has_a_model_py():
    names = sorted(p.parent.name for p in REPO.glob("*/config.pbtxt"))
    assert names == [
        "controlnet",
        "denoise",
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


def test_the_stream_model_takes_txt2img_inputs_and_calls_the_ensembles_stages():
    stream, txt2img, denoise = (_load_config(n) for n in ("txt2img_stream", "txt2img", "denoise"))
    assert stream.model_transaction_policy.decoupled and not txt2img.model_transaction_policy.decoupled
    assert [(i.name, i.data_type, list(i.dims)) for i in stream.input] == [
        *((i.name, i.data_type, list(i.dims)) for i in txt2img.input),
        ("PREVIEW_EVERY", model_config_pb2.TYPE_INT32, [1]),
    ]
    assert {o.name for o in txt2img.output} < {o.name for o in stream.output}
    calls = {k: v.string_value for k, v in stream.parameters.items()}
    assert calls == {f"{s.model_name}_model": s.model_name for s in txt2img.ensemble_scheduling.step}
    assert {"PROGRESS_ADDRESS", "PREVIEW_EVERY"} <= {i.name for i in denoise.input if i.optional}


def test_ensemble_wiring_matches_stage_inputs_and_outputs():
    ensemble = _load_config("txt2img")
    public = {i.name for i in ensemble.input}
    produced = set(public)
    for step in ensemble.ensemble_scheduling.step:
        stage = _load_config(step.model_name)
        stage_inputs = {i.name: i for i in stage.input}
        assert set(step.input_map) <= set(stage_inputs), step.model_name
        for key, value in step.input_map.items():
            assert value in produced, f"{step.model_name}.{key} reads {value} before it is produced"
        required = {n for n, i in stage_inputs.items() if not i.optional}
        assert required <= set(step.input_map), f"{step.model_name} misses {required - set(step.input_map)}"
        assert set(step.output_map) <= {o.name for o in stage.output}
        produced |= set(step.output_map.values())
    assert {o.name for o in ensemble.output} <= produced


def test_public_contract_names_and_types():
    ensemble = _load_config("txt2img")
    types = {i.name: (i.data_type, i.optional) for i in ensemble.input}
    from tritonclient.grpc import model_config_pb2 as pb

    assert types == {
        "PROMPT": (pb.TYPE_STRING, True),  # required, enforced by text_encoder (see config.pbtxt)
        "NEGATIVE_PROMPT": (pb.TYPE_STRING, True),
        "PROMPT_2": (pb.TYPE_STRING, True),  # SDXL only
        "NEGATIVE_PROMPT_2": (pb.TYPE_STRING, True),
        "SEED": (pb.TYPE_INT64, True),
        "STEPS": (pb.TYPE_INT32, True),
        "GUIDANCE_SCALE": (pb.TYPE_FP32, True),
        "HEIGHT": (pb.TYPE_INT32, True),
        "WIDTH": (pb.TYPE_INT32, True),
        "SCHEDULER": (pb.TYPE_STRING, True),
        "LORA_NAMES": (pb.TYPE_STRING, True),
        "LORA_SCALES": (pb.TYPE_FP32, True),
        "LORA_BOUND_K": (pb.TYPE_INT32, True),
        "CONTROLNET_NAMES": (pb.TYPE_STRING, True),
        "CONTROLNET_IMAGES": (pb.TYPE_UINT8, True),
        "CONTROLNET_SCALES": (pb.TYPE_FP32, True),
        "CONTROLNET_GUIDANCE_START": (pb.TYPE_FP32, True),
        "CONTROLNET_GUIDANCE_END": (pb.TYPE_FP32, True),
        "ORIGINAL_SIZE": (pb.TYPE_INT32, True),  # SDXL only
        "CROPS_COORDS_TOP_LEFT": (pb.TYPE_INT32, True),
        "TARGET_SIZE": (pb.TYPE_INT32, True),
        "DEADLINE_MS": (pb.TYPE_INT32, True),  # the step scheduler's deadline
    }
    outputs = {o.name: o for o in ensemble.output}
    image = outputs["IMAGE"]
    assert image.data_type == pb.TYPE_UINT8 and list(image.dims) == [-1, -1, 3]
    assert outputs["LORA_LANDED_STEP"].data_type == pb.TYPE_INT32


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
