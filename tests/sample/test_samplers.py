"""Sampler correctness on problems with known answers, and step parity with diffusers."""
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from data_contracts.errors import ConfigError
from tasks.sample.samplers import SAMPLERS, check_sampler, sample
from tasks.diffusion.schedules import flow_sigmas

MU, SD = 0.5, 0.5


def gaussian_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Exact E[ε − x0 | x_σ] for data x0 ~ N(MU, SD²) (per element)."""
    a = 1.0 - sigma
    x0 = MU + a * SD ** 2 / (a * a * SD ** 2 + sigma * sigma) * (x - a * MU)
    return (x - x0) / sigma


def point_velocity(c: float):
    return lambda x, sigma: (x - c) / sigma  # data = a single point c


def test_one_euler_step_equals_flow_match_euler_scheduler_step():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(48)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 12, generator=g)
    v = torch.randn(2, 4, 16, 12, generator=g)
    for i in (0, 17, 47):  # first, middle, last step
        sched._step_index = i
        ref = sched.step(v, sched.timesteps[i], x).prev_sample
        ours = sample("euler", lambda _x, _s: v, x, sched.sigmas[i:i + 2])
        assert torch.equal(ours, ref), i


def test_euler_loop_equals_diffusers_loop():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(20)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x = x0.clone()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(gaussian_velocity(x, float(sched.sigmas[i])), t, x).prev_sample
    ours = sample("euler", gaussian_velocity, x0.clone(), flow_sigmas(20, 3.0))
    assert torch.equal(ours, x)


@pytest.mark.parametrize("steps", [5, 20, 48])
def test_dpmpp_2m_equals_diffusers_dpm_solver_with_flow_sigmas(steps):
    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
                                        solver_order=2, algorithm_type="dpmsolver++", final_sigmas_type="zero")
    sched.set_timesteps(steps)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    x = x0.clone()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(gaussian_velocity(x, float(sched.sigmas[i])), t, x).prev_sample
    ours = sample("dpmpp_2m", gaussian_velocity, x0.clone(), sched.sigmas)
    torch.testing.assert_close(ours, x, atol=2e-6, rtol=0)


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_recovers_a_gaussian_data_distribution(name):
    # With the exact velocity of N(MU, SD²) data, a sampler must turn N(0,1) noise into N(MU, SD²).
    x = torch.randn(4, 5000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = (x - x.mean()) / x.std()
    gens = [torch.Generator().manual_seed(10 + i) for i in range(4)]
    out = sample(name, gaussian_velocity, x, flow_sigmas(200, 3.0, "simple"), generators=gens)
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(SD, rel=0.06)
    wrong = sample(name, gaussian_velocity, x, flow_sigmas(200, 3.0, "simple")[:100], generators=gens)
    assert abs(wrong.std().item() - SD) > 0.1  # stopping half way is visibly wrong: the check can fail


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_sde"])
def test_stochastic_samplers_keep_the_flow_marginal(name):
    # For point data c, x_σ = (1−σ)c + σε; one stochastic step must land on (1−σ')c + σ'ε' with std σ'.
    c, s, s_next = 0.3, 0.8, 0.55
    x = (1 - s) * c + s * torch.randn(1, 200_000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = sample(name, point_velocity(c), x, torch.tensor([s, s_next, 0.0], dtype=torch.float64)[:2],
                 generators=[torch.Generator().manual_seed(4)])
    resid = out - (1 - s_next) * c
    assert resid.mean().item() == pytest.approx(0.0, abs=0.01)
    assert resid.std().item() == pytest.approx(s_next, rel=0.01)


def test_euler_ancestral_with_eta_0_is_euler():
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sig = flow_sigmas(12, 3.0).double()
    a = sample("euler_ancestral", gaussian_velocity, x, sig, eta=0.0, generators=[None, None])
    b = sample("euler", gaussian_velocity, x, sig)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_sde"])
def test_noise_is_per_image(name):
    # Row i's noise comes from generator i only: batching does not change an image.
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(6))
    sig = flow_sigmas(8, 3.0)
    both = sample(name, gaussian_velocity, x, sig, generators=[torch.Generator().manual_seed(s) for s in (1, 2)])
    second = sample(name, gaussian_velocity, x[1:], sig, generators=[torch.Generator().manual_seed(2)])
    torch.testing.assert_close(both[1:], second)
    other = sample(name, gaussian_velocity, x[1:], sig, generators=[torch.Generator().manual_seed(3)])
    assert not torch.allclose(other, second)


def test_unknown_sampler_is_a_config_error():
    with pytest.raises(ConfigError, match="dpmpp_2m"):
        check_sampler("ddim")
