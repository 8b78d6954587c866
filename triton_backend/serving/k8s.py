"""Kubernetes manifests for a split deployment (``swiftdiffusion repository --k8s``), rendered from the same
description as the repositories.

Two server roles, each a Deployment + Service running stock ``tritonserver`` on a rendered repository:

- ``pipeline``: every pipeline's public model and stages except the ControlNet service, whose callers get
  ``controlnet_url`` = the ``controlnet`` Service (docs/operations.md "Stages on another server");
- ``controlnet``: the pipelines' ControlNet services (``NAME_controlnet``), scaled on their own.

Both mount the weights (a PersistentVolumeClaim, at the same path the repositories name) and the rendered
repositories (a second claim; each role reads its own sub-directory), are ready on ``/v2/health/ready`` and expose
``/metrics`` to Prometheus. One ControlNet replica per Service: hint handles must return to the server that made
them (a second replica needs its own Service and URL, or session affinity; ``sessionAffinity: ClientIP`` is set).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .repository import Layout, Pipeline, render

HTTP, GRPC, METRICS = 8000, 8001, 8002
ROLES = ("pipeline", "controlnet")


def render_split(out: Path, pipelines: list[Pipeline], layout: Layout, image: str, weights_claim: str) -> list[Path]:
    """``out/repositories/{pipeline,controlnet}`` and ``out/k8s/swiftdiffusion.yaml``; returns the files written."""
    import yaml

    repos = out / "repositories"
    controlnet_url = f"swiftdiffusion-controlnet:{GRPC}"
    render(repos / "pipeline", pipelines, layout, remote={"controlnet": controlnet_url})
    render(repos / "controlnet", pipelines, layout, load_stages=False)
    for model in (repos / "controlnet").iterdir():  # the ControlNet server serves only the ControlNet services
        if not model.name.endswith("_controlnet"):
            _remove_tree(model)
    weights = sorted({str(p.model_dir) for p in pipelines})
    docs = []
    for role in ROLES:
        gpu = bool(layout.gpus) and (role == "pipeline" or "controlnet" in layout.gpus)
        docs += [deployment(role, image, weights, weights_claim, gpu), service(role)]
    manifest = out / "k8s" / "swiftdiffusion.yaml"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return [repos / "pipeline", repos / "controlnet", manifest]


def deployment(role: str, image: str, weights: list[str], weights_claim: str, gpu: bool) -> dict[str, Any]:
    name = f"swiftdiffusion-{role}"
    repository = f"/repositories/{role}"
    mounts = [{"name": "repositories", "mountPath": "/repositories", "readOnly": True}]
    mounts += [{"name": "weights", "mountPath": w, "subPath": Path(w).name, "readOnly": True} for w in weights]
    resources: dict[str, Any] = {"requests": {"cpu": "4", "memory": "16Gi"}}
    if gpu:
        resources["limits"] = {"nvidia.com/gpu": 1}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {
                    "labels": {"app": name},
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "containers": [
                        {
                            "name": "tritonserver",
                            "image": image,
                            "command": ["tritonserver"],
                            "args": [
                                f"--model-repository={repository}",
                                f"--http-port={HTTP}",
                                f"--grpc-port={GRPC}",
                                f"--metrics-port={METRICS}",
                                "--strict-readiness=true",
                            ],
                            "ports": [
                                {"name": "http", "containerPort": HTTP},
                                {"name": "grpc", "containerPort": GRPC},
                                {"name": "metrics", "containerPort": METRICS},
                            ],
                            "readinessProbe": {
                                "httpGet": {"path": "/v2/health/ready", "port": HTTP},
                                "periodSeconds": 5,
                            },
                            "livenessProbe": {
                                "httpGet": {"path": "/v2/health/live", "port": HTTP},
                                "initialDelaySeconds": 60,
                                "periodSeconds": 10,
                            },
                            "resources": resources,
                            "volumeMounts": [*mounts, {"name": "dshm", "mountPath": "/dev/shm"}],
                        }
                    ],
                    "volumes": [
                        {"name": "repositories", "persistentVolumeClaim": {"claimName": "swiftdiffusion-repositories"}},
                        {"name": "weights", "persistentVolumeClaim": {"claimName": weights_claim}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "4Gi"}},
                    ],
                },
            },
        },
    }


def service(role: str) -> dict[str, Any]:
    name = f"swiftdiffusion-{role}"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "selector": {"app": name},
            "sessionAffinity": "ClientIP",
            "ports": [
                {"name": "http", "port": HTTP, "targetPort": HTTP},
                {"name": "grpc", "port": GRPC, "targetPort": GRPC},
                {"name": "metrics", "port": METRICS, "targetPort": METRICS},
            ],
        },
    }


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)
