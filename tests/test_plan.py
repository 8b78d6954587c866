"""One plan per deployment: typed parameters (one table), the layouts the renderer writes, the plan each model
resolves at load, and the request contract written from the schema."""

from pathlib import Path

import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from triton_backend import parameters, plan
from triton_backend.config import StageConfig
from triton_backend.errors import ConfigError
from triton_backend.paths import baseline_repository_dir, model_repository_dir
from triton_backend.serving import contract
from triton_backend.serving.repository import LAYOUT_NAMES, Layout, Pipeline, render

ROOT = Path(__file__).resolve().parents[1]
REPO = model_repository_dir()
CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)  # (a device object only: no CUDA needed)


def _config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _params(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def _templates() -> dict[str, Path]:
    out = {p.parent.name: p for p in REPO.glob("*/config.pbtxt")}
    return {**out, "baseline": baseline_repository_dir() / "txt2img" / "config.pbtxt"}


@pytest.mark.parametrize("role", sorted(_templates()))
def test_every_shipped_parameter_is_in_the_table_at_its_default(role):
    """Defaults live in one place: each shipped config holds exactly its model's parameters, at the table's
    defaults (the renderer adds load_stages, remote_timeout_s and <role>_url where it needs them).
    """
    shipped = _params(_config(_templates()[role]))
    table = {
        k: v
        for k, v in parameters.model_params(role).items()
        if k not in parameters.RENDERED and not k.endswith("_url")
    }
    assert shipped == table


def test_the_parameter_docs_are_generated_from_the_table():
    assert (ROOT / "docs" / "parameters.md").read_text() == parameters.markdown(), (
        "run: python -m triton_backend.parameters > docs/parameters.md"
    )


@pytest.mark.parametrize(("raw", "allowed"), [
    ({"lora_bound_k": "banana"}, "auto or an integer >= 0"),
    ({"lora_bound_k": "-1"}, "auto or an integer >= 0"),
    ({"max_pending": "0"}, "an integer >= 1"),
    ({"late_policy": "drop"}, "serve, reject"),
    ({"latent_parallel": "yes"}, "auto, on, off"),
    ({"layout": "gpu"}, "split, cpu"),
])  # fmt: skip
def test_a_bad_value_is_refused_naming_model_parameter_and_allowed_values(raw, allowed):
    ((name, value),) = raw.items()
    with pytest.raises(ConfigError) as info:
        parameters.parse("sd15_denoise", "denoise", raw)
    assert str(info.value) == f"sd15_denoise: parameter {name}={value!r}; allowed: {allowed}"


def test_typed_values_defaults_and_unknown_parameters():
    values = parameters.parse("denoise", "denoise", {"lora_bound_k": "3", "max_active": ""})
    assert values["lora_bound_k"] == 3 and values["max_active"] == "auto" and values["max_pending"] == 64
    assert values["remote_timeout_s"] == 60.0 and values["layout"] == "split"
    with pytest.raises(ConfigError, match=r"denoise: no parameter 'freeze' in a denoise model of layout split"):
        parameters.parse("denoise", "denoise", {"freeze": "on"})  # (the split's denoise runs no UNet)
    assert parameters.parse("denoise", "denoise", {"layout": "cpu", "freeze": "off"})["freeze"] == "off"
    assert parameters.RELOAD not in parameters.parse("vae", "vae", {parameters.RELOAD: "3"})  # (the watchdog's)
    with pytest.raises(ConfigError, match="no parameter 'unet_model' in a denoise model of layout cpu"):
        parameters.parse("denoise", "denoise", {"layout": "cpu", "unet_model": "unet"})


def test_the_plan_of_each_role_on_a_cpu_and_on_a_gpu():
    def resolve(role, raw, device=CPU, **kw):
        return plan.resolve(role, role, parameters.parse(role, role, raw), device, **kw)

    cpu_denoise = resolve("denoise", {"layout": "cpu"})
    assert (cpu_denoise.unet, cpu_denoise.controlnets, cpu_denoise.freeze) == ("in-process", "in-process", True)
    assert cpu_denoise.cpu_gate and not cpu_denoise.latent_parallel and cpu_denoise.dtype == "float32"
    assert cpu_denoise.line().startswith("plan denoise: layout=cpu device=cpu dtype=float32 threads=")
    assert cpu_denoise.line().endswith("cpu_gate=on unet=in-process controlnets=in-process freeze=on")
    assert resolve("denoise", {"layout": "cpu", "freeze": "off"}).freeze is False
    split = resolve("denoise", {})
    assert (split.unet, split.controlnets, split.latent_parallel) == ("unet", "controlnet", False)
    assert "latent_parallel=off" in split.line() and "freeze" not in split.line()
    remote = resolve("denoise", {"unet_url": "gpu-box:8001", "latent_parallel": "on"})
    assert remote.unet == "unet@gpu-box:8001" and remote.latent_parallel  # (its instances are not known here)
    unet = resolve("unet", {})
    assert unet.freeze and unet.controlnets == "controlnet" and not resolve("unet", {}, GPU).freeze
    assert resolve("unet", {"freeze": "on"}, GPU).freeze  # (an explicit on holds on a GPU: not measured there)
    assert resolve("vae", {}).channels_last and not resolve("vae", {}, GPU).channels_last
    on_gpu = resolve("text_encoder", {}, GPU)
    assert on_gpu.dtype == "float16" and not on_gpu.cpu_gate and on_gpu.device == "cuda:0"
    assert not resolve("text_encoder", {}, instance_count=2).cpu_gate  # (instances meant to share the cores)
    with pytest.raises(ConfigError, match=r"text_encoder: parameter cpu_gate=on, but this instance runs on cuda:0"):
        resolve("text_encoder", {"cpu_gate": "on"}, GPU)


@pytest.mark.parametrize(("layout", "instances", "setting", "expected"), [
    ("2gpu", 2, "auto", True),
    ("1gpu", 1, "auto", False),
    ("2gpu", 2, "off", False),
    ("1gpu", 1, "on", "the unet model 'unet' has 1 instance: the two branches need two"),
])  # fmt: skip
def test_latent_parallelism_follows_the_unet_instances_the_layout_renders(
    model_dir, tmp_path, layout, instances, setting, expected
):
    repo = render(tmp_path, [Pipeline("txt2img", model_dir)], Layout.named(layout), stage_prefix="")
    assert len(_config(repo / "unet" / "config.pbtxt").instance_group[0].gpus) == instances
    raw = {**_params(_config(repo / "denoise" / "config.pbtxt")), "latent_parallel": setting}
    values = parameters.parse("denoise", "denoise", raw)
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=f"latent_parallel=on, but {expected}"):
            plan.resolve("denoise", "denoise", values, CPU, repository=repo)
    else:
        assert plan.resolve("denoise", "denoise", values, CPU, repository=repo).latent_parallel is expected


def test_the_cpu_layout_renders_only_the_models_that_run(model_dir, tmp_path):
    repo = render(tmp_path, [Pipeline("txt2img", model_dir)], Layout.named("cpu"), stage_prefix="")
    assert sorted(p.name for p in repo.iterdir()) == [
        "denoise", "img2img", "img2img_stream", "lora_manager", "text_encoder", "txt2img", "txt2img_stream", "vae"
    ]  # fmt: skip
    denoise = _params(_config(repo / "denoise" / "config.pbtxt"))
    assert denoise["layout"] == "cpu" and denoise["num_threads"] == "0"  # (it runs the UNet: every core)
    assert set(denoise) == set(parameters.model_params("denoise", "cpu")) - {"remote_timeout_s", "lora_manager_url"}
    cfg = StageConfig.from_params("denoise", denoise)
    assert cfg.plan.unet_in_process and cfg.plan.controlnets == "in-process" and cfg.stage("unet") == "unet"


def test_the_checked_in_repository_is_what_the_renderer_writes_for_the_split_layout(model_dir, tmp_path):
    repo = render(tmp_path, [Pipeline("txt2img", model_dir)], Layout.named("split"), stage_prefix="", load_stages=False)
    templates = {p.parent.name: p for p in REPO.glob("*/config.pbtxt")}
    assert sorted(p.name for p in repo.iterdir()) == sorted(templates)
    for name, path in templates.items():
        rendered = _config(repo / name / "config.pbtxt")
        if "model_dir" in rendered.parameters:  # (what a deployment writes: its model, whether stages load stages)
            assert rendered.parameters["model_dir"].string_value == str(model_dir)
            rendered.parameters["model_dir"].string_value = ""
        if "load_stages" in rendered.parameters:
            assert rendered.parameters.pop("load_stages").string_value == "off"
        assert rendered == _config(path), name


def test_the_renderer_refuses_what_a_layout_cannot_run_and_bad_values_by_name(model_dir, tmp_path):
    pipeline = [Pipeline("txt2img", model_dir)]
    with pytest.raises(ValueError, match="layout cpu renders no unet model"):
        render(tmp_path, pipeline, Layout.named("cpu"), overrides={"unet": {"freeze": "off"}})
    with pytest.raises(ValueError, match="layout cpu renders no controlnet model"):
        render(tmp_path, pipeline, Layout.named("cpu"), remote={"controlnet": "cn:8001"})
    with pytest.raises(ValueError, match=r"txt2img_denoise: parameter lora_bound_k='banana'; allowed: auto or an"):
        render(tmp_path, pipeline, Layout.named("cpu"), overrides={"denoise": {"lora_bound_k": "banana"}})
    with pytest.raises(ValueError, match="denoise has no parameter 'latent_parallel' in layout cpu"):
        render(tmp_path, pipeline, Layout.named("cpu"), overrides={"denoise": {"latent_parallel": "on"}})
    with pytest.raises(ValueError, match="unknown layout 'gpu'"):
        Layout.named("gpu")


def test_serve_picks_the_layout_for_the_gpus_it_sees():
    assert [Layout.auto(n).name for n in (0, 1, 2, 3, 4, 8)] == ["cpu", "1gpu", "2gpu", "2gpu+1c", "2gpu+2c", "2gpu+2c"]
    assert set(LAYOUT_NAMES) == {"cpu", "split", "1gpu", "2gpu", "2gpu+1c", "2gpu+2c"}


@pytest.mark.parametrize("template", sorted(contract.MODELS))
def test_the_request_contract_is_written_from_the_schema(template):
    """The inputs of every model that carries the request are the schema's; after a schema change:
    python -m triton_backend.serving.contract
    """
    path = contract.checked_in(ROOT)[template]
    assert contract.refresh(path.read_text(), template) == path.read_text()
