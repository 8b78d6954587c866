import asyncio

import pytest
import torch

from triton_backend.config import StageConfig
from triton_backend.errors import InvalidRequestError
from triton_backend.paths import model_repository_dir
from triton_backend.stages.unet import LocalSteps, StepInput, UNetStep, parse_step

from .helpers import unet_forward

REPO = model_repository_dir()


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
        single = unet_forward(unet, step)
        assert out.shape == single.shape
        torch.testing.assert_close(out, single, rtol=1e-4, atol=1e-5)


def test_per_row_timesteps_matter(unet):
    s = _step(1)
    other = StepInput(s.sample, s.timestep + 300, s.encoder_hidden_states)
    assert (unet_forward(unet, s) - unet_forward(unet, other)).abs().mean() > 1e-3


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


class CountingUNet:
    """The real UNet step, recording the requests of each pass."""

    def __init__(self, unet, fail_first: bool = False):
        self.unet, self.passes, self.fail_first = unet, [], fail_first

    def forward_many(self, steps):
        self.passes.append(len(steps))
        if self.fail_first and len(self.passes) == 1:
            raise RuntimeError("the pass failed")
        return self.unet.forward_many(steps)


def _run_concurrently(local, groups):
    """Every group of steps as one generation's request, all started on one loop in the same turn."""

    async def main():
        return await asyncio.gather(*(local.run(g) for g in groups), return_exceptions=True)

    return asyncio.run(main())


def test_local_steps_batch_the_requests_queued_together_and_each_gets_its_own_result(unet):
    counting = CountingUNet(unet)
    local = LocalSteps(counting.forward_many, max_rows=16)
    groups = [[_step(1)], [_step(2, rows=1)], [_step(3), _step(4)]]
    results = _run_concurrently(local, groups)
    assert counting.passes == [4]  # one pass for the four requests queued in the same turn
    for group, outs in zip(groups, results, strict=True):
        for step, out in zip(group, outs, strict=True):
            torch.testing.assert_close(out, unet_forward(unet, step), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("max_rows", "passes"), [(4, [2, 2, 1]), (2, [1, 1, 1, 1, 1]), (0, [1, 1, 1, 1, 1])])
def test_local_steps_keep_to_the_row_limit_of_a_pass(unet, max_rows, passes):
    """``max_rows`` rows per pass (the unet model's ``max_batch_size``); 0 = no batching (one request per pass)."""
    counting = CountingUNet(unet)
    local = LocalSteps(counting.forward_many, max_rows=max_rows)
    _run_concurrently(local, [[_step(i)] for i in range(5)])  # 2 rows each
    assert counting.passes == passes


def test_a_failed_local_pass_fails_its_requests_and_the_next_pass_runs(unet):
    counting = CountingUNet(unet, fail_first=True)
    local = LocalSteps(counting.forward_many, max_rows=2)
    first, second = _run_concurrently(local, [[_step(1)], [_step(2)]])
    assert isinstance(first, RuntimeError) and "the pass failed" in str(first)
    torch.testing.assert_close(second[0], unet_forward(unet, _step(2)), rtol=1e-4, atol=1e-5)
    assert _run_concurrently(local, [[_step(3)]])[0][0].shape == (2, 4, 8, 8)


def test_a_cancelled_generation_s_queued_step_is_dropped(unet):
    counting = CountingUNet(unet)
    local = LocalSteps(counting.forward_many, max_rows=16)

    async def main():
        doomed = asyncio.ensure_future(local.run([_step(1)]))
        kept = asyncio.ensure_future(local.run([_step(2)]))
        await asyncio.sleep(0)  # both queued; the pass has not started
        doomed.cancel()
        return await kept

    out = asyncio.run(main())
    assert counting.passes == [1] and out[0].shape == (2, 4, 8, 8)


def _frozen_vs_eager(unet, step, residuals=None):
    """Noise prediction of ``step`` through the frozen halves of ``unet`` and through the eager halves."""
    from triton_backend.controlnet.unet_split import decoder_half, encoder_half

    added, graphs = step.added_cond_kwargs(), unet.frozen_halves()
    with torch.inference_mode():
        args = (step.sample, step.timestep, step.encoder_hidden_states, added)
        frozen = graphs.decoder(graphs.encoder(*args), *(residuals or ()))
        eager = decoder_half(unet.model, encoder_half(unet.model, *args), *(residuals or ()))
    return frozen, eager


def test_frozen_halves_compute_the_eager_result_bitwise(unet):
    """``freeze`` (on by default on a CPU): any batch size, latent size and prompt length, with ControlNet
    residuals, and after weights are patched in place (as LoRAs are); latents the graphs do not fit run eagerly.
    """
    assert unet.freeze
    for step in (_step(1), _step(2, rows=1), _step(3, rows=5), _step(4, size=16)):
        frozen, eager = _frozen_vs_eager(unet, step)
        assert torch.equal(frozen, eager)
    seq = _step(5)
    seq.encoder_hidden_states = seq.encoder_hidden_states[:, :20]
    assert torch.equal(*_frozen_vs_eager(unet, seq))
    with torch.inference_mode():
        state = unet.frozen_halves().encoder(seq.sample, seq.timestep, seq.encoder_hidden_states)
    residuals = ([torch.randn_like(r) for r in state.down_block_res_samples], torch.randn_like(state.sample))
    frozen, eager = _frozen_vs_eager(unet, seq, residuals)
    assert torch.equal(frozen, eager) and not torch.equal(frozen, _frozen_vs_eager(unet, seq)[0])

    before = unet.forward_many([_step(6)])[0]
    weights = [m.weight for m in unet.model.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    pristine = [w.detach().clone() for w in weights]
    with torch.no_grad():
        for w in weights:
            w.add_(0.01)
        try:
            frozen, eager = _frozen_vs_eager(unet, _step(6))
            assert torch.equal(frozen, eager) and not torch.equal(frozen, before)
        finally:
            for w, p in zip(weights, pristine, strict=True):
                w.copy_(p)
    assert torch.equal(unet.forward_many([_step(6)])[0], before)

    odd = 2 * unet.frozen_halves().up_factor + 1  # (not a multiple of the up-sampling factor)
    assert not unet.frozen_halves().fits(_step(7, size=odd).sample)
    torch.testing.assert_close(unet.forward_many([_step(7, size=odd)])[0], unet_forward(unet, _step(7, size=odd)))


def test_frozen_sdxl_halves_compute_the_eager_result_bitwise(sdxl_model_dir):
    from triton_backend.model_info import ModelInfo

    unet = UNetStep(StageConfig.from_params("unet", {"model_dir": str(sdxl_model_dir)}))
    info = ModelInfo.read(sdxl_model_dir)
    g = torch.Generator().manual_seed(0)
    for rows in (1, 2, 3):
        step = StepInput(
            torch.randn(rows, 4, 8, 8, generator=g),
            torch.full((rows,), 321.0),
            torch.randn(rows, 77, info.cross_attention_dim, generator=g),
            text_embeds=torch.randn(rows, info.pooled_dim, generator=g),
            time_ids=torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * rows),
        )
        assert torch.equal(*_frozen_vs_eager(unet, step))


def test_freeze_parameter_and_the_trace_at_the_first_pass(model_dir):
    from triton_backend.errors import ConfigError

    plain = UNetStep(StageConfig.from_params("unet", {"model_dir": str(model_dir), "freeze": "off"}))
    plain.forward_many([_step(1)])
    assert not plain.freeze and plain.frozen is None
    frozen = UNetStep(StageConfig.from_params("unet", {"model_dir": str(model_dir)}))
    assert frozen.freeze and frozen.frozen is None  # (not traced at load: a process may never run a pass)
    assert torch.equal(frozen.forward_many([_step(1)])[0], plain.forward_many([_step(1)])[0])
    assert frozen.frozen is not None
    with pytest.raises(ConfigError, match="freeze"):
        UNetStep(StageConfig.from_params("unet", {"model_dir": str(model_dir), "freeze": "yes"}))
