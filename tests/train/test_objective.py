"""Objective math against hand-computed values and against diffusers' own schedulers."""
from __future__ import annotations

import math

import pytest
import torch

from tasks.diffusion.objectives import (
    Objective,
    cosmap_weight,
    ddpm_noisy,
    flow_denoised,
    flow_noisy,
    flow_target,
    flow_timestep,
    sd15_alphas_cumprod,
    shift_sigma,
    sigma_from_uniform,
    weighted_mse,
)


def test_shift_formula_hand_values():
    # σ' = sσ / (1 + (s-1)σ)
    assert shift_sigma(0.5, 2.0) == pytest.approx(2 * 0.5 / 1.5)  # 0.6667
    assert shift_sigma(0.5, 3.0) == pytest.approx(0.75)
    assert shift_sigma(0.25, 3.0) == pytest.approx(0.75 / 1.5)  # 0.5
    assert shift_sigma(0.0, 3.0) == 0.0 and shift_sigma(1.0, 3.0) == 1.0
    assert shift_sigma(0.3, 1.0) == pytest.approx(0.3)  # s = 1 is the identity


def test_flow_noising_target_sign_and_timestep():
    x0 = torch.tensor([[[[2.0]]], [[[2.0]]]])
    eps = torch.tensor([[[[-1.0]]], [[[-1.0]]]])
    sigma = torch.tensor([0.25, 1.0])
    xt = flow_noisy(x0, eps, sigma)
    assert xt.flatten().tolist() == pytest.approx([0.75 * 2 + 0.25 * -1, -1.0])  # 1.25, pure noise at σ=1
    assert flow_target(x0, eps).flatten().tolist() == [-3.0, -3.0]  # ε − x0, not x0 − ε
    assert flow_timestep(torch.tensor([0.25, 0.5])).tolist() == [250.0, 500.0]
    # x̂0 = x_t − σ·v recovers x0 with the true velocity
    assert flow_denoised(xt, flow_target(x0, eps), sigma).flatten().tolist() == pytest.approx([2.0, 2.0])


def test_flow_matches_diffusers_flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(10)
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = sched.timesteps[3:4]
    sigma = sched.sigmas[3:4]
    ours = flow_noisy(x0, eps, sigma)
    theirs = sched.scale_noise(x0, t, eps)
    torch.testing.assert_close(ours, theirs)
    assert float(flow_timestep(sigma)) == pytest.approx(float(t))  # the UNet timestep is σ·1000


def test_sd15_schedule_hand_values_and_diffusers():
    from diffusers import DDPMScheduler

    ac = sd15_alphas_cumprod()
    assert float(ac[0]) == pytest.approx(1 - 0.00085)
    b1 = (0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) / 999) ** 2
    assert float(ac[1]) == pytest.approx((1 - 0.00085) * (1 - b1))
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    torch.testing.assert_close(ac.float(), ref)
    # t = 500: logSNR ≈ −0.96 under SD1.5 vs 0 for flow σ = 0.5 (REFERENCE's trap)
    assert math.log(float(ac[500] / (1 - ac[500]))) == pytest.approx(-0.96, abs=0.02)
    x0, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(ddpm_noisy(x0, eps, t), ddpm.add_noise(x0, eps, t))


def test_objective_inputs_flow_and_ddpm():
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    flow = Objective("flow", shift=2.0)
    lv = flow.levels([0.1, 0.5, 0.9], [0, 0, 0])
    xt, ts, target, w = flow.inputs(x0, eps, lv)
    assert ts.tolist() == pytest.approx([100.0, 500.0, 900.0])
    torch.testing.assert_close(target, eps - x0)
    torch.testing.assert_close(xt[1], 0.5 * x0[1] + 0.5 * eps[1])
    assert w.tolist() == [1.0, 1.0, 1.0]
    ddpm = Objective("ddpm")
    xt, ts, target, w = ddpm.inputs(x0, eps, ddpm.levels([0, 0, 0], [0, 499, 999]))
    assert ts.dtype == torch.long and ts.tolist() == [0, 499, 999]
    torch.testing.assert_close(target, eps)  # ε-prediction


def test_draws_uniform_logit_normal_and_shift():
    def draws(obj, n=4000):
        g = torch.Generator().manual_seed(0)
        return torch.tensor([obj.draw(g)[0] for _ in range(n)])

    uni = draws(Objective("flow", shift=1.0, sampling="uniform"))
    assert 0.0 <= float(uni.min()) and float(uni.max()) <= 1.0
    assert float(uni.mean()) == pytest.approx(0.5, abs=0.02)
    ln = draws(Objective("flow", shift=1.0, sampling="logit_normal"))
    assert float(ln.median()) == pytest.approx(0.5, abs=0.03)  # sigmoid(N(0,1)) is centred at 0.5
    assert float(ln.std()) < float(uni.std())  # and concentrated in the middle
    shifted = draws(Objective("flow", shift=2.0, sampling="logit_normal"))
    # the same draws, shifted: the median moves to shift(0.5) = 2/3
    assert float(shifted.median()) == pytest.approx(2 / 3, abs=0.03)
    torch.testing.assert_close(shifted, shift_sigma(ln, 2.0), rtol=1e-5, atol=1e-6)
    u = torch.tensor([0.3])
    assert float(sigma_from_uniform(u, "logit_normal", 0.5, 2.0, torch.tensor([1.0]))) == pytest.approx(
        1 / (1 + math.exp(-2.5)))
    g = torch.Generator().manual_seed(0)
    ts = [Objective("ddpm").draw(g)[1] for _ in range(2000)]
    assert min(ts) >= 0 and max(ts) <= 999 and len(set(ts)) > 800


def test_weights_scale_the_loss_as_documented():
    """loss = mean_i(w_i · mean_pixels((pred_i − target_i)²)); weight 0 removes a sample's gradient."""
    pred = torch.tensor([[1.0, 1.0], [0.0, 2.0]], requires_grad=True)
    target = torch.zeros(2, 2)
    mse = [1.0, 2.0]  # per-sample mean squared error
    loss, per = weighted_mse(pred, target, torch.tensor([1.0, 1.0]))
    assert per.tolist() == mse and float(loss.detach()) == pytest.approx(1.5)
    loss, _ = weighted_mse(pred, target, torch.tensor([2.0, 0.5]))
    assert float(loss.detach()) == pytest.approx((2.0 * 1.0 + 0.5 * 2.0) / 2)
    loss, _ = weighted_mse(pred, target, torch.tensor([3.0, 0.0]))
    loss.backward()
    assert pred.grad[1].abs().sum() == 0  # the held-out / zero-weight sample moves nothing
    assert float(cosmap_weight(torch.tensor(0.5))) == pytest.approx(2 / (math.pi * 0.5))
