"""The Triton model classes (``serving.models``, ``controlnet.model``, ``lora.model``) against their configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from triton_backend.paths import baseline_repository_dir, model_repository_dir
from triton_backend.serving.process import SPIN_COUNT, no_compiler_disable

PYTHON_MODELS = [
    (repo, path.name)
    for repo in (model_repository_dir(), baseline_repository_dir())
    for path in sorted(repo.iterdir())
    if (path / "1" / "model.py").is_file()
]


def load_model_py(model_py: Path, expression: str, env: dict[str, str] | None = None) -> str:
    """Import a ``model.py`` in a fresh interpreter, as Triton's stub does (a stage's ``model.py`` leaves packages out
    of its process, so it must not be imported into this one), and return ``expression`` evaluated there.
    """
    code = (
        "import sys, importlib.util as u; s = u.spec_from_file_location('m', sys.argv[1]); m = u.module_from_spec(s);"
        f" s.loader.exec_module(m); print({expression})"
    )
    base = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}  # (a developer's own setting would win)
    out = subprocess.run(
        [sys.executable, "-c", code, str(model_py)], capture_output=True, text=True, env={**base, **(env or {})}
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(("repo", "name"), PYTHON_MODELS, ids=[f"{r.name}/{n}" for r, n in PYTHON_MODELS])
def test_model_class_reads_exactly_the_inputs_its_config_declares(repo, name):
    config = text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    declared = {i.name for i in config.input}
    read = set(
        json.loads(
            load_model_py(repo / name / "1" / "model.py", "__import__('json').dumps(m.TritonPythonModel.inputs)")
        )
    )
    assert read == declared, f"read but not declared: {read - declared}; declared but never read: {declared - read}"


def test_model_py_files_are_thin_shells():
    for repo, name in PYTHON_MODELS:
        code = (repo / name / "1" / "model.py").read_text()
        assert code.count("\n") < 12 and "class TritonPythonModel(" in code, f"{repo.name}/{name}"


def test_the_1gpu_layout(model_dir, tmp_path):
    """One UNet instance on GPU 0; in fp16 the ControlNet residuals cross processes in fp16, in fp32 in fp32."""
    from triton_backend.serving.repository import Layout, Pipeline, render

    for dtype, residuals in (("float16", "TYPE_FP16"), ("auto", "TYPE_FP16"), ("float32", "TYPE_FP32")):
        repo = render(tmp_path / dtype, [Pipeline("txt2img", model_dir)], Layout.named("1gpu", dtype), stage_prefix="")
        unet = text_format.Parse((repo / "unet" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        gpu = model_config_pb2.ModelInstanceGroup.KIND_GPU
        assert [(g.count, g.kind, list(g.gpus)) for g in unet.instance_group] == [(1, gpu, [0])]
        controlnet = text_format.Parse(
            (repo / "controlnet" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        (out,) = [o for o in controlnet.output if o.name == "RESIDUALS"]
        assert model_config_pb2.DataType.Name(out.data_type) == residuals


@pytest.mark.parametrize("public", ["txt2img", "txt2img_stream"])
def test_the_public_models_import_no_torch(public):
    """``txt2img`` and ``txt2img_stream`` run no model: their processes must not pay for torch (~220 MB) or
    diffusers."""
    model_py = model_repository_dir() / public / "1" / "model.py"
    imported = "sorted(n for n in ('torch', 'diffusers', 'transformers') if n in sys.modules)"
    assert load_model_py(model_py, imported) == "[]"


@pytest.mark.parametrize(
    ("stage", "left_out"),
    [
        ("unet", ["peft", "scipy", "torch._dynamo", "transformers"]),
        ("denoise", ["peft", "torch._dynamo", "transformers"]),
        ("text_encoder", ["peft", "scipy"]),
    ],
)
def test_a_stage_process_leaves_out_what_it_does_not_use(stage, left_out):
    """diffusers would import transformers, peft and scipy (~90 MB) and the compiler (~67 MB) into every stage
    process; the stage's own libraries still import (the server tests run the images).
    """
    model_py = model_repository_dir() / stage / "1" / "model.py"
    names = "('transformers', 'peft', 'scipy', 'torch._dynamo')"
    absent = f"(sorted(n for n in {names} if n in sys.modules and sys.modules[n] is None), 'sympy' in sys.modules)"
    assert load_model_py(model_py, absent) == str((left_out, "torch._dynamo" not in left_out))


def test_without_the_compiler_a_disable_mark_is_the_function_itself():
    def f():
        return 1

    assert no_compiler_disable(f) is f
    assert no_compiler_disable(recursive=False)(f) is f


def test_a_stage_process_spins_its_openmp_threads_briefly_unless_told_otherwise():
    model_py = model_repository_dir() / "vae" / "1" / "model.py"
    spin = "__import__('os').environ['GOMP_SPINCOUNT']"
    assert load_model_py(model_py, spin) == SPIN_COUNT
    assert load_model_py(model_py, spin, env={"GOMP_SPINCOUNT": "300000"}) == "300000"


@pytest.mark.parametrize(
    ("first", "error"), [("torch", "before torch is imported"), ("numpy", "numpy is already imported")]
)
def test_prepare_refuses_a_process_that_already_imported_what_it_sets_up(first, error):
    code = f"import {first}; from triton_backend.serving.process import prepare; prepare(leave_out=('numpy',))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and error in out.stderr
