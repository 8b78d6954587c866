"""Rendering a fleet repository (``swiftdiffusion repository``): names, parameters, layouts, package data."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from triton_backend.serving.repository import PUBLIC_MODELS, Layout, Pipeline, pipeline_models, render, rendered_names

GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU


def config(repo: Path, name: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_two_pipelines_are_namespaced_and_self_contained(model_dir, sdxl_model_dir, tmp_path):
    (tmp_path / "theirs" / "1").mkdir(parents=True)  # a fleet model already in the repository stays
    (tmp_path / "theirs" / "config.pbtxt").write_text('name: "theirs"\n')
    render(tmp_path, [Pipeline("sd", model_dir), Pipeline("xl", sdxl_model_dir)])
    assert (tmp_path / "theirs" / "config.pbtxt").read_text() == 'name: "theirs"\n'
    assert set(rendered_names(tmp_path)) == {*pipeline_models("sd"), *pipeline_models("xl")}
    for name, model in (("sd", model_dir), ("xl", sdxl_model_dir)):
        public = config(tmp_path, name)
        stages = {k: v.string_value for k, v in public.parameters.items() if k.endswith("_model")}
        assert public.name == name and stages == {
            "text_encoder_model": f"{name}_text_encoder",
            "denoise_model": f"{name}_denoise",
            "vae_model": f"{name}_vae",
        }
        for stage in pipeline_models(name)[1:]:
            c = config(tmp_path, stage)
            assert c.name == stage and (tmp_path / stage / "1" / "model.py").is_file()
            if stage not in pipeline_models(name)[: len(PUBLIC_MODELS)]:  # (the public models run no model)
                assert c.parameters["model_dir"].string_value == str(model.resolve())  # no environment variable
            calls = {k: v.string_value for k, v in c.parameters.items() if k.endswith("_model")}
            assert all(v.startswith(f"{name}_") for v in calls.values())
            if calls:
                assert c.parameters["load_stages"].string_value == "on"
    assert config(tmp_path, "sd_denoise").parameters["unet_model"].string_value == "sd_unet"


def test_gpu_layouts(model_dir, tmp_path):
    render(tmp_path, [Pipeline("p", model_dir)], Layout.named("2gpu", "float16"))
    unet = config(tmp_path, "p_unet")
    assert [(g.kind, list(g.gpus), g.count) for g in unet.instance_group] == [(GPU, [0, 1], 1)]  # latent parallel
    assert unet.parameters["dtype"].string_value == "float16"
    assert [list(g.gpus) for g in config(tmp_path, "p_vae").instance_group] == [[1]]
    (residuals,) = [o for o in config(tmp_path, "p_controlnet").output if o.name == "RESIDUALS"]
    assert residuals.data_type == model_config_pb2.TYPE_FP16
    denoise = config(tmp_path, "p_denoise")
    assert denoise.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


def test_serve_renders_the_documented_names(model_dir, tmp_path):
    render(tmp_path, [Pipeline("txt2img", model_dir)], stage_prefix="", load_stages=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(pipeline_models("txt2img", ""))
    assert config(tmp_path, "denoise").parameters["load_stages"].string_value == "off"
    assert config(tmp_path, "txt2img_stream").parameters["vae_model"].string_value == "vae"


def test_streaming_can_be_left_out(model_dir, tmp_path):
    render(tmp_path, [Pipeline("sd", model_dir)], streaming=False)
    assert set(rendered_names(tmp_path)) == set(pipeline_models("sd")) - {"sd_stream", "sd_img2img_stream"}


@pytest.mark.parametrize(
    ("spec", "needle"), [("nodir", "NAME=MODEL_DIR"), ("a/b=/x", "letters"), ("p=/nonexistent", "model_index")]
)
def test_bad_pipeline_specs(spec, needle):
    with pytest.raises(ValueError, match=needle):
        Pipeline.parse(spec)


def test_the_wheel_ships_the_templates(tmp_path):
    root = str(Path(__file__).resolve().parents[1])
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(root),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("swiftdiffusion-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for stage in ("txt2img", "text_encoder", "denoise", "unet", "vae", "controlnet", "lora_manager"):
        assert f"triton_backend/model_repository/{stage}/config.pbtxt" in names
    assert "triton_backend/model_repository/unet/1/model.py" in names
    assert "triton_backend/baseline_repository/txt2img/1/model.py" in names


def test_k8s_split_deployment_is_consistent(model_dir, sdxl_model_dir, tmp_path):
    """No cluster here: the manifests must reference the rendered repositories, ports and health endpoints."""
    import yaml

    from triton_backend.serving.k8s import GRPC, HTTP, METRICS, render_split

    pipelines = [Pipeline("sd", model_dir), Pipeline("xl", sdxl_model_dir)]
    render_split(tmp_path, pipelines, Layout.named("1gpu"), "img:1", "weights")
    docs = list(yaml.safe_load_all((tmp_path / "k8s" / "swiftdiffusion.yaml").read_text()))
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert set(deployments) == set(services) == {"swiftdiffusion-pipeline", "swiftdiffusion-controlnet"}
    for name, dep in deployments.items():
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        repo = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--model-repository="))
        assert (tmp_path / repo.lstrip("/")).is_dir()  # /repositories/<role> = the claim's rendered sub-directory
        assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": HTTP}
        assert {p["containerPort"] for p in container["ports"]} == {HTTP, GRPC, METRICS}
        assert {p["port"] for p in services[name]["spec"]["ports"]} == {HTTP, GRPC, METRICS}
        assert services[name]["spec"]["selector"] == dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS)
        mounted = {m["mountPath"] for m in container["volumeMounts"]}
        for model in rendered_names(tmp_path / repo.lstrip("/")):
            params = config(tmp_path / repo.lstrip("/"), model).parameters
            if "model_dir" in params:  # every stage's weights are mounted where its config says
                assert params["model_dir"].string_value in mounted, model
    pipeline_repo, controlnet_repo = tmp_path / "repositories" / "pipeline", tmp_path / "repositories" / "controlnet"
    assert sorted(rendered_names(controlnet_repo)) == ["sd_controlnet", "xl_controlnet"]
    assert not (pipeline_repo / "sd_controlnet").exists()
    url = f"swiftdiffusion-controlnet:{GRPC}"  # the Service's name and gRPC port
    for stage in ("sd_denoise", "sd_unet", "xl_denoise", "xl_unet"):
        assert config(pipeline_repo, stage).parameters["controlnet_url"].string_value == url


def test_pipelines_of_one_architecture_share_adapters_never_across(model_dir, sdxl_model_dir, tmp_path):
    pipelines = [Pipeline("a", model_dir), Pipeline("b", model_dir), Pipeline("xl", sdxl_model_dir)]
    render(tmp_path, pipelines, share_adapters=True)
    names = set(rendered_names(tmp_path))
    assert {"a_controlnet", "a_lora_manager", "xl_controlnet", "xl_lora_manager"} <= names
    assert not {"b_controlnet", "b_lora_manager"} & names
    for stage, role in (("b_denoise", "controlnet"), ("b_unet", "controlnet"), ("b_text_encoder", "lora_manager")):
        assert config(tmp_path, stage).parameters[f"{role}_model"].string_value == f"a_{role}"
    assert config(tmp_path, "xl_denoise").parameters["controlnet_model"].string_value == "xl_controlnet"


def test_documented_switches_can_be_set_and_unknown_ones_are_refused(model_dir, tmp_path):
    gated = ("text_encoder", "unet", "vae", "controlnet", "lora_manager")
    render(tmp_path, [Pipeline("p", model_dir)], overrides={stage: {"cpu_gate": "off"} for stage in gated})
    assert all(config(tmp_path, f"p_{stage}").parameters["cpu_gate"].string_value == "off" for stage in gated)
    with pytest.raises(ValueError, match="has no parameter 'cpu_gates'"):
        render(tmp_path, [Pipeline("p", model_dir)], overrides={"unet": {"cpu_gates": "off"}})
