import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from data_contracts.errors import ConfigError
from tasks.diffusion.schedules import comfy_sd3_table, flow_sigmas, shift_sigmas


@pytest.mark.parametrize("shift", [1.0, 2.0, 3.0, 4.0])
@pytest.mark.parametrize("steps", [1, 2, 7, 28, 48])
def test_flow_sigmas_equal_diffusers_flow_match_euler(shift, steps):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    ours = flow_sigmas(steps, shift)
    assert torch.equal(ours, sched.sigmas)  # bit for bit, final 0 included
    assert torch.equal(ours[:-1] * 1000, sched.timesteps)  # UNet timesteps are sigma*1000


def test_diffusers_schedule_shifts_the_low_end_twice():
    # Documented quirk: set_timesteps shifts linspace(1, shift(1/1000), N) again.
    sig = flow_sigmas(48, 3.0)
    assert sig[0] == 1.0 and sig[-1] == 0.0
    assert sig[-2].item() == pytest.approx(shift_sigmas(shift_sigmas(0.001, 3.0), 3.0), rel=1e-5)
    assert sig[-2].item() == pytest.approx(0.0089, abs=1e-4)


def test_comfy_simple_walks_the_model_sampling_sd3_table():
    table = comfy_sd3_table(3.0)
    assert len(table) == 1000 and table[-1] == 1.0
    assert table[0].item() == pytest.approx(3 * 0.001 / (1 + 2 * 0.001))
    sig = flow_sigmas(48, 3.0, "simple")
    assert len(sig) == 49 and sig[0] == 1.0 and sig[-1] == 0.0
    # step 47 takes table[-(1 + int(47 * 1000 / 48))] = table[-980] = shift(21/1000)
    assert sig[-2].item() == pytest.approx(3 * 0.021 / (1 + 2 * 0.021), rel=1e-6)
    # ComfyUI ends far higher than diffusers: the deliberate, documented difference.
    diff = (sig - flow_sigmas(48, 3.0)).abs()
    assert 0.04 < diff.max().item() < 0.06
    assert torch.all(sig[:-1] > sig[1:])  # strictly descending


def test_simple_with_shift_1_is_linear_when_steps_divide_1000():
    sig = flow_sigmas(10, 1.0, "simple")
    assert torch.allclose(sig, torch.tensor([1.0, .9, .8, .7, .6, .5, .4, .3, .2, .1, 0.0]), atol=1e-6)


def test_bad_schedule_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="schedule"):
        flow_sigmas(10, 3.0, "karras")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="steps"):
        flow_sigmas(0, 3.0)
    with pytest.raises(ConfigError, match="shift"):
        flow_sigmas(10, 0.0)
