"""The Triton model classes (``serving.models``, ``controlnet.model``, ``lora.model``) against their configs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from triton_backend.paths import baseline_repository_dir, model_repository_dir

PYTHON_MODELS = [
    (repo, path.name)
    for repo in (model_repository_dir(), baseline_repository_dir())
    for path in sorted(repo.iterdir())
    if (path / "1" / "model.py").is_file()
]


def model_class(model_py: Path) -> type:
    spec = importlib.util.spec_from_file_location(f"model_{model_py.parent.parent.name}", model_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TritonPythonModel


@pytest.mark.parametrize(("repo", "name"), PYTHON_MODELS, ids=[f"{r.name}/{n}" for r, n in PYTHON_MODELS])
def test_model_class_reads_exactly_the_inputs_its_config_declares(repo, name):
    config = text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    declared = {i.name for i in config.input}
    read = set(model_class(repo / name / "1" / "model.py").inputs)
    assert read == declared, f"read but not declared: {read - declared}; declared but never read: {declared - read}"


def test_model_py_files_are_thin_shells():
    for repo, name in PYTHON_MODELS:
        code = (repo / name / "1" / "model.py").read_text()
        assert code.count("\n") < 12 and "class TritonPythonModel(" in code, f"{repo.name}/{name}"


def test_gpu_repository_layout():
    """One UNet instance on GPU 0; in fp16 the ControlNet residuals cross processes in fp16, in fp32 in fp32."""
    from triton_backend.serving.server import gpu_repository

    for dtype, residuals in (("float16", "TYPE_FP16"), ("auto", "TYPE_FP16"), ("float32", "TYPE_FP32")):
        repo = gpu_repository(dtype=dtype)
        unet = text_format.Parse((repo / "unet" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        gpu = model_config_pb2.ModelInstanceGroup.KIND_GPU
        assert [(g.count, g.kind, list(g.gpus)) for g in unet.instance_group] == [(1, gpu, [0])]
        controlnet = text_format.Parse(
            (repo / "controlnet" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        (out,) = [o for o in controlnet.output if o.name == "RESIDUALS"]
        assert model_config_pb2.DataType.Name(out.data_type) == residuals


def test_the_stream_model_imports_no_torch():
    """``txt2img_stream`` runs no model: its process must not pay for torch (~220 MB) or diffusers."""
    import subprocess
    import sys

    code = (
        "import sys, importlib.util as u; s = u.spec_from_file_location('m', sys.argv[1]); m = u.module_from_spec(s);"
        " s.loader.exec_module(m); print(sorted(n for n in ('torch', 'diffusers', 'transformers') if n in sys.modules))"
    )
    model_py = model_repository_dir() / "txt2img_stream" / "1" / "model.py"
    out = subprocess.run([sys.executable, "-c", code, str(model_py)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
