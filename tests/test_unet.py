import pytest
import torch

from triton_backend.config import StageConfig
from triton_backend.errors import InvalidRequestError
from triton_backend.stages.unet import StepInput, UNetStep, parse_step


@pytest.fixture(scope="module")
def unet(model_dir):
    return UNetStep(StageConfig.from_params("unet", {"model_dir": str(model_dir)}))


def _step(seed, rows=2, size=8):
    g = torch.Generator().manual_seed(seed)
    return StepInput(
        torch.randn(rows, 4, size, size, generator=g),
        torch.full((rows,), float(seed * 97 % 1000)),
        torch.randn(rows, 77, 32, generator=g),
    )


def test_batched_equals_single(unet):
    """Rows of different requests at different timesteps in one forward pass give each its own result."""
    steps = [_step(1), _step(2, rows=1), _step(3), _step(4, size=16)]
    batched = unet.forward_many(steps)
    for step, out in zip(steps, batched, strict=True):
        single = unet.forward(step)
        assert out.shape == single.shape
        torch.testing.assert_close(out, single, rtol=1e-4, atol=1e-5)


def test_per_row_timesteps_matter(unet):
    s = _step(1)
    other = StepInput(s.sample, s.timestep + 300, s.encoder_hidden_states)
    assert (unet.forward(s) - unet.forward(other)).abs().mean() > 1e-3


@pytest.mark.parametrize(
    "name,bad",
    [
        ("SAMPLE", {"SAMPLE": torch.zeros(2, 3, 8, 8)}),
        ("TIMESTEP", {"TIMESTEP": torch.zeros(3)}),
        ("ENCODER_HIDDEN_STATES", {"ENCODER_HIDDEN_STATES": torch.zeros(2, 77, 16)}),
        ("SAMPLE", {"SAMPLE": torch.zeros(2, 4, 8, 8, dtype=torch.float64)}),
    ],
)
def test_bad_tensors_are_rejected_by_name(unet, name, bad):
    s = _step(1)
    fields = {
        "SAMPLE": s.sample,
        "TIMESTEP": s.timestep.reshape(-1, 1),
        "ENCODER_HIDDEN_STATES": s.encoder_hidden_states,
    }
    fields.update(bad)
    with pytest.raises(InvalidRequestError) as info:
        parse_step({k: v.numpy() for k, v in fields.items()}, unet.info)
    assert info.value.field == name
