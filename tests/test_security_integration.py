"""A locked-down server on the real tritonserver: gRPC over TLS, the model-control API behind a key, request size
limits enforced before any work.
"""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest
from swiftdiffusion_client import Client, ClientError, GenerationRequest, InvalidArgumentError
from tritonclient.utils import InferenceServerException

from triton_backend.serving.server import ADMIN_HEADER, GRPC_ADMIN_HEADER

from .helpers import hint_images, start_server

pytestmark = pytest.mark.integration

KEY = "correct-horse-battery-staple"


@pytest.fixture(scope="module")
def locked(model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("locked")
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    overrides = {"denoise": {"max_hint_bytes": "20000"}}
    srv = start_server(model_dir, work, tls_cert=cert, tls_key=key, admin_key=KEY, overrides=overrides)
    yield srv, cert
    srv.stop()


def test_grpc_is_served_over_tls_only(locked):
    srv, cert = locked
    with Client(srv.grpc_url, timeout_s=60, tls_root_cert=str(cert)) as c:
        assert c.generate(GenerationRequest(prompt="over tls", steps=2)).shape == (64, 64, 3)
    with Client(srv.grpc_url, timeout_s=10) as plain:
        assert not plain.is_ready()
        with pytest.raises(ClientError):
            plain.generate(GenerationRequest(prompt="in the clear", steps=2))


def test_model_control_needs_the_admin_key_over_grpc_and_http(locked):
    srv, _ = locked
    client = srv.client()
    try:
        with pytest.raises(InferenceServerException, match=rf"restricted.*{GRPC_ADMIN_HEADER}"):
            client.unload_model("txt2img")
        with pytest.raises(InferenceServerException):
            client.get_model_repository_index()
        assert client.is_model_ready("txt2img")
        url = f"http://{srv.http_url}/v2/repository/index"
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=10)
        keyed = urllib.request.Request(url, method="POST", headers={ADMIN_HEADER: KEY})
        assert b"txt2img" in urllib.request.urlopen(keyed, timeout=10).read()
        assert client.is_model_ready("txt2img")
        index = client.get_model_repository_index(headers=srv.admin_headers)
        assert "txt2img" in {m.name for m in index.models}
    finally:
        client.close()


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"PROMPT": np.array([b"x" * 40000], dtype=object)}, r"PROMPT.*40000 bytes; at most 32768"),
        (
            {"CONTROLNET_NAMES": np.array([b"edges", b"depth"], dtype=object), "CONTROLNET_IMAGES": hint_images(2)},
            r"CONTROLNET_IMAGES.*24576 bytes; at most 20000",
        ),
    ],
)
def test_oversized_inputs_are_refused_naming_the_field(locked, override, needle):
    srv, cert = locked
    with Client(srv.grpc_url, timeout_s=60, tls_root_cert=str(cert)) as c:
        inputs = {"PROMPT": np.array([b"a cat"], dtype=object), "STEPS": np.array([2], dtype=np.int32), **override}
        with pytest.raises(InvalidArgumentError, match=needle):
            c.infer_raw(inputs)
        assert c.generate(GenerationRequest(prompt="still serving", steps=2)).shape == (64, 64, 3)
