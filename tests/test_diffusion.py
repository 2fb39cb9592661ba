"""Behaviour of the diffusion parts: schedule, denoiser, timestep sampling, loss, samplers and guidance."""

import numpy as np
import pytest
import torch

from satvideo.diffusion import (
    DiscreteDenoiser,
    DiscreteSampling,
    DynamicCFG,
    VanillaCFG,
    VideoDDIMSampler,
    VideoDiffusionLoss,
    VPODEDPMPP2MSampler,
    VPSDEDPMPP2MSampler,
    ZeroSNRDDPMDiscretization,
)
from satvideo.config import ConfigError
from satvideo.diffusion.denoiser import append_dims
from satvideo.diffusion.discretization import trailing_timesteps
from satvideo.diffusion.sigma_sampling import timestep_interval

SHAPE = (2, 3, 4, 8, 8)  # latent video [B, T, C, H, W]
DISCRETIZATION = {"target": "satvideo.diffusion.ZeroSNRDDPMDiscretization", "params": {"shift_scale": 3.0}}
SCALING = {"target": "satvideo.diffusion.VideoScaling"}
SAMPLING = {
    "target": "satvideo.diffusion.DiscreteSampling",
    "params": {"discretization_config": DISCRETIZATION, "num_idx": 1000},
}
SAMPLERS = [VideoDDIMSampler, VPODEDPMPP2MSampler, VPSDEDPMPP2MSampler]
ALPHAS = ZeroSNRDDPMDiscretization(shift_scale=3.0).alphas_cumprod_sqrt.float()


def make_denoiser() -> DiscreteDenoiser:
    return DiscreteDenoiser(num_idx=1000, discretization_config=DISCRETIZATION, scaling_config=SCALING)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def v_oracle(x0: torch.Tensor, calls: list | None = None):
    """A network returning the exact v = alpha * noise - sigma * x0 for data x0, the noise being implied by x.

    It records (x, timesteps, kwargs) of each call in `calls`. A doubled (guided) batch sees x0 tiled.
    """

    def network(x, timesteps, context, **kwargs):
        if calls is not None:
            calls.append((x.clone(), timesteps.clone(), kwargs))
        alpha = append_dims(ALPHAS[timesteps], x.ndim)
        target = x0.repeat((x.shape[0] // x0.shape[0],) + (1,) * (x.ndim - 1))
        return (alpha * x - target) / (1 - alpha**2).sqrt()

    return network


# discretization


def reference_alphas_cumprod_sqrt(shift_scale: float | None) -> np.ndarray:
    """sqrt of diffusers' CogVideoXDDIMScheduler(rescale_betas_zero_snr=True) alphas_cumprod, in numpy.

    shift_scale None leaves the SNR-shift step out entirely.
    """
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    if shift_scale is not None:
        alphas_cumprod = alphas_cumprod / (shift_scale + (1 - shift_scale) * alphas_cumprod)
    root = np.sqrt(alphas_cumprod)
    return (root - root[-1]) * root[0] / (root[0] - root[-1])


@pytest.mark.parametrize("shift_scale", [1.0, 3.0])
def test_discretization_is_a_zero_snr_schedule(shift_scale):
    alphas = ZeroSNRDDPMDiscretization(shift_scale=shift_scale).alphas_cumprod_sqrt
    alphas_cumprod_0 = 1 - 0.00085
    assert alphas.shape == (1000,) and alphas.dtype == torch.float64
    assert (alphas[1:] < alphas[:-1]).all()
    assert alphas[-1].item() == 0.0
    expected_first = (alphas_cumprod_0 / (shift_scale + (1 - shift_scale) * alphas_cumprod_0)) ** 0.5
    assert alphas[0].item() == pytest.approx(expected_first, abs=1e-12)


@pytest.mark.parametrize("shift_scale", [1.0, 2.0, 3.0])
def test_discretization_matches_numpy_reference(shift_scale):
    alphas = ZeroSNRDDPMDiscretization(shift_scale=shift_scale).alphas_cumprod_sqrt.numpy()
    np.testing.assert_allclose(alphas, reference_alphas_cumprod_sqrt(shift_scale), rtol=0, atol=1e-12)


def test_shift_scale_one_is_no_shift():
    alphas = ZeroSNRDDPMDiscretization(shift_scale=1.0).alphas_cumprod_sqrt.numpy()
    np.testing.assert_allclose(alphas, reference_alphas_cumprod_sqrt(None), rtol=0, atol=1e-15)


def snr(alphas: torch.Tensor) -> torch.Tensor:
    return alphas**2 / (1 - alphas**2)


def test_larger_shift_lowers_snr_except_at_zero_terminal_snr():
    plain = ZeroSNRDDPMDiscretization(shift_scale=1.0).alphas_cumprod_sqrt
    shifted = ZeroSNRDDPMDiscretization(shift_scale=3.0).alphas_cumprod_sqrt
    assert (snr(shifted[:-1]) < snr(plain[:-1])).all()
    assert shifted[-1] == plain[-1] == 0


def test_keep_start_keeps_the_first_noise_level():
    plain = ZeroSNRDDPMDiscretization(shift_scale=1.0).alphas_cumprod_sqrt
    kept = ZeroSNRDDPMDiscretization(shift_scale=3.0, keep_start=True).alphas_cumprod_sqrt
    assert kept[0].item() == pytest.approx(plain[0].item(), abs=1e-12)
    assert (snr(kept[100:-1]) < snr(plain[100:-1])).all()  # the shift still dominates past the start


def test_post_shift_divides_the_rescaled_snr():
    plain = ZeroSNRDDPMDiscretization(shift_scale=1.0).alphas_cumprod_sqrt
    post = ZeroSNRDDPMDiscretization(shift_scale=3.0, post_shift=True).alphas_cumprod_sqrt
    torch.testing.assert_close(snr(post[:-1]), snr(plain[:-1]) / 3.0, rtol=1e-10, atol=0)
    assert post[-1].item() == 0.0


def test_trailing_timesteps():
    assert trailing_timesteps(10, 1000) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert trailing_timesteps(1, 1000) == [999]
    assert trailing_timesteps(1000, 1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 1000\], got 0"):
        ZeroSNRDDPMDiscretization(timestep_spacing="trailing").timesteps(0)
    with pytest.raises(ConfigError, match=r"timestep_spacing='leading': expected one of linspace, trailing"):
        ZeroSNRDDPMDiscretization(timestep_spacing="leading")


# denoiser


def test_denoiser_recovers_x0_from_the_true_v():
    x0, noise = randn(*SHAPE), randn(*SHAPE, seed=1)
    timesteps = torch.tensor([999, 3])
    alpha = append_dims(ALPHAS[timesteps], len(SHAPE))
    noised = alpha * x0 + (1 - alpha**2).sqrt() * noise
    calls = []
    estimate = make_denoiser()(v_oracle(x0, calls), noised, ALPHAS[timesteps], {}, flag=True)
    torch.testing.assert_close(estimate, x0, rtol=0, atol=1e-5)
    x_seen, timesteps_seen, kwargs_seen = calls[0]
    assert timesteps_seen.dtype == torch.int64 and timesteps_seen.tolist() == [999, 3]
    assert torch.equal(x_seen, noised) and kwargs_seen == {"flag": True}


def test_denoiser_maps_every_table_alpha_to_its_timestep():
    denoiser = make_denoiser()
    assert torch.equal(denoiser.timestep_of(ALPHAS), torch.arange(1000))


def test_denoiser_weight_is_the_v_prediction_weight():
    alpha = ALPHAS[torch.tensor([0, 500, 999])]
    torch.testing.assert_close(make_denoiser().w(alpha), 1 / (1 - alpha**2))


def test_denoiser_refuses_tables_not_indexed_by_timestep():
    with pytest.raises(ValueError, match="do_append_zero must be False and flip True"):
        DiscreteDenoiser(1000, DISCRETIZATION, SCALING, flip=False)
    with pytest.raises(ValueError, match=r"num_idx \(500\) must equal the discretization's num_timesteps \(1000\)"):
        DiscreteDenoiser(500, DISCRETIZATION, SCALING)


# timestep sampling


def rank_intervals(world_size: int, **params) -> list[tuple[int, int]]:
    intervals = []
    for rank in range(world_size):
        sampler = DiscreteSampling(DISCRETIZATION, 1000, uniform_sampling=True, rank=rank, world_size=world_size,
                                   **params)
        low, high = sampler.interval()
        alphas, timesteps = sampler(256, generator=torch.Generator().manual_seed(rank))
        assert ((timesteps >= low) & (timesteps < high)).all()
        assert torch.equal(alphas, ALPHAS[timesteps])
        intervals.append((low, high))
    return intervals


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_uniform_sampling_is_ignored_on_eight_ranks_or_fewer_as_in_the_original(world_size):
    assert rank_intervals(world_size) == [(0, 1000)] * world_size


def test_uniform_sampling_follows_the_original_formula_where_the_original_runs():
    # group_num 8 on 16 ranks: two ranks per group, width 1000 // 8 = 125
    assert rank_intervals(16, group_num=8) == [(125 * (rank // 2), 125 * (rank // 2 + 1)) for rank in range(16)]
    # one group per rank where the original needs group_num > 0 and stops: all of [0, 1000) covered
    assert rank_intervals(16) == [(1000 * rank // 16, 1000 * (rank + 1) // 16) for rank in range(16)]
    # the 1.5 configs' group_num: 40 (world_size must then divide by 40 in the original)
    intervals = rank_intervals(80, group_num=40)
    assert intervals[0] == intervals[1] == (0, 25) and intervals[78] == intervals[79] == (975, 1000)
    assert len(set(intervals)) == 40


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_min_ranks_option_stratifies_small_worlds(world_size):
    intervals = rank_intervals(world_size, uniform_sampling_min_ranks=2)
    assert intervals == [(1000 * rank // world_size, 1000 * (rank + 1) // world_size) for rank in range(world_size)]


@pytest.mark.parametrize("world_size, group_num", [(80, 0), (128, 0), (16, 40), (48, 40), (3, 0)])
def test_where_the_original_stops_every_timestep_is_drawn_by_some_rank(world_size, group_num):
    intervals = sorted(set(timestep_interval(rank, world_size, 1000, group_num) for rank in range(world_size)))
    assert intervals[0][0] == 0 and intervals[-1][1] == 1000
    assert all(previous[1] == following[0] for previous, following in zip(intervals, intervals[1:]))


def test_group_num_larger_than_the_world_gives_every_rank_its_own_interval():
    assert [timestep_interval(rank, 8, 1000, group_num=40) for rank in (0, 7)] == [(0, 125), (875, 1000)]


def test_uniform_sampling_reads_the_process_group(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 16)
    assert DiscreteSampling(DISCRETIZATION, 1000, uniform_sampling=True).interval() == (125, 187)
    assert DiscreteSampling(DISCRETIZATION, 1000).interval() == (0, 1000)


def test_rank_outside_the_world_is_an_error():
    with pytest.raises(ValueError, match=r"rank 4 is not in \[0, 4\)"):
        timestep_interval(4, 4, 1000)


# loss


def make_loss(**params) -> VideoDiffusionLoss:
    return VideoDiffusionLoss(sigma_sampler_config=SAMPLING, **params)


def test_loss_is_zero_for_the_true_v():
    torch.manual_seed(0)
    x = randn(*SHAPE)
    loss = make_loss()(v_oracle(x), make_denoiser(), {}, x)
    assert loss.shape == (SHAPE[0],)
    assert loss.abs().max() < 1e-8


@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_loss_is_the_v_error(loss_type):
    """With a network predicting v = 0, the l2 loss is mean(v^2) and the l1 loss mean(|v| / sigma)."""
    torch.manual_seed(0)
    x = randn(*SHAPE)
    calls = []

    def zero_v(x_t, timesteps, context):
        calls.append((x_t.clone(), timesteps))
        return torch.zeros_like(x_t)

    loss = make_loss(type=loss_type)(zero_v, make_denoiser(), {}, x)
    noised, timesteps = calls[0]
    alpha = append_dims(ALPHAS[timesteps], x.ndim)
    sigma = (1 - alpha**2).sqrt()
    v = (alpha * noised - x) / sigma
    expected = v.square() if loss_type == "l2" else v.abs() / sigma
    torch.testing.assert_close(loss, expected.flatten(1).mean(1), rtol=1e-4, atol=0)
    assert (loss > 0).all()


def test_loss_fixed_frames_are_clean_and_unscored():
    torch.manual_seed(0)
    x = randn(*SHAPE)
    calls = []
    network = v_oracle(x, calls)

    def wrong_on_first_frame(x_t, timesteps, context):
        v = network(x_t, timesteps, context)
        v[:, 0] += 1.0
        return v

    loss = make_loss(fixed_frames=1)(wrong_on_first_frame, make_denoiser(), {}, x)
    assert torch.equal(calls[0][0][:, 0], x[:, 0])
    assert loss.abs().max() < 1e-8


def test_loss_forwards_batch_entries_to_the_network():
    loss_fn = make_loss(batch2model_keys="ofs")
    calls = []
    x = randn(*SHAPE)
    loss_fn(v_oracle(x, calls), make_denoiser(), {}, x, ofs=torch.ones(2))
    assert torch.equal(calls[0][2]["ofs"], torch.ones(2))


def test_offset_noise_shifts_each_sample():
    torch.manual_seed(0)
    x = torch.zeros(8, 1, 1, 16, 16)
    means = {}
    for level in (0.0, 10.0):
        calls = []
        make_loss(offset_noise_level=level)(v_oracle(x, calls), make_denoiser(), {}, x)
        noised, timesteps, _ = calls[0]
        noise = noised / append_dims((1 - ALPHAS[timesteps] ** 2).sqrt(), x.ndim)
        means[level] = noise.flatten(1).mean(1)
    assert means[0.0].abs().max() < 0.5  # 256 unit normals per sample
    assert means[10.0].std() > 3.0  # one N(0, 10^2) offset per sample


def test_unknown_loss_type_is_an_error():
    with pytest.raises(ValueError, match=r"loss type 'lpips' is not one of \('l2', 'l1'\)"):
        make_loss(type="lpips")


# samplers


def make_sampler(sampler_cls, num_steps=10, **params):
    guider = {"target": "satvideo.diffusion.VanillaCFG", "params": {"scale": 5.0}}
    return sampler_cls(num_steps=num_steps, discretization_config=DISCRETIZATION, guider_config=guider, **params)


def run(sampler, network, x, seed=0):
    denoiser = make_denoiser()
    cond, uc = {"crossattn": torch.ones(SHAPE[0], 2)}, {"crossattn": torch.zeros(SHAPE[0], 2)}
    generator = torch.Generator().manual_seed(seed)
    return sampler(lambda x_t, alpha, c: denoiser(network, x_t, alpha, c), x, cond, uc, generator=generator)


@pytest.mark.parametrize("num_steps", [10, 7])
@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_sampler_recovers_x0_along_the_forward_marginals(sampler_cls, num_steps):
    """With an exact network, every state is alpha_t * x0 + sigma_t * noise at the timestep it is seen at.

    Deterministic samplers keep the initial noise; the SDE sampler keeps a unit normal one. The check at
    7 steps shows that each step lands on the next visited timestep (diffusers' DDIM would go to t - 142).
    Tolerances are float32 rounding (measured: x0 to 2.4e-7, implied noise to 3.1e-6, the latter amplified
    by 1 / sigma_t); stepping one timestep off would move the implied noise by about 2.5e-3 * |x0|.
    """
    x0, noise = randn(*SHAPE), randn(*SHAPE, seed=1)
    calls = []
    out = run(make_sampler(sampler_cls, num_steps), v_oracle(x0, calls), noise.clone())
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)
    assert [c[1][0].item() for c in calls] == ZeroSNRDDPMDiscretization().timesteps(num_steps)
    for x_t, timesteps, _ in calls:
        alpha = ALPHAS[timesteps[0]]
        implied_noise = (x_t[: SHAPE[0]] - alpha * x0) / (1 - alpha**2).sqrt()
        if sampler_cls is VPSDEDPMPP2MSampler:
            assert abs(implied_noise.mean()) < 0.1 and abs(implied_noise.std() - 1) < 0.1
        else:
            torch.testing.assert_close(implied_noise, noise, rtol=0, atol=1e-4)


def test_ddim_ignores_the_generator_and_sde_follows_it():
    network = v_oracle(randn(*SHAPE))
    noise = randn(*SHAPE, seed=1)

    def sample(sampler_cls, seed):
        return run(make_sampler(sampler_cls, num_steps=4), lambda *a: 0.5 * network(*a), noise.clone(), seed)

    assert torch.equal(sample(VideoDDIMSampler, 0), sample(VideoDDIMSampler, 1))
    assert torch.equal(sample(VPSDEDPMPP2MSampler, 0), sample(VPSDEDPMPP2MSampler, 0))
    assert not torch.allclose(sample(VPSDEDPMPP2MSampler, 0), sample(VPSDEDPMPP2MSampler, 1))


@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_fixed_frames_stay_as_given(sampler_cls):
    clean_first = randn(SHAPE[0], 1, *SHAPE[2:], seed=2)
    x = torch.cat([clean_first, randn(SHAPE[0], SHAPE[1] - 1, *SHAPE[2:], seed=1)], dim=1)
    calls = []
    out = run(make_sampler(sampler_cls, num_steps=4, fixed_frames=1), v_oracle(randn(*SHAPE), calls), x)
    assert torch.equal(out[:, :1], clean_first)
    assert all(torch.equal(x_t[: SHAPE[0], :1], clean_first) for x_t, _, _ in calls)
    assert not torch.equal(out[:, 1:], x[:, 1:])


def test_verbose_shows_a_progress_bar(capsys):
    run(make_sampler(VideoDDIMSampler, num_steps=3, verbose=True), v_oracle(randn(*SHAPE)), randn(*SHAPE))
    assert "VideoDDIMSampler" in capsys.readouterr().err
    run(make_sampler(VideoDDIMSampler, num_steps=3), v_oracle(randn(*SHAPE)), randn(*SHAPE))
    assert capsys.readouterr().err == ""


def test_sampler_without_guider_runs_one_batch():
    calls = []
    sampler = VideoDDIMSampler(num_steps=2, discretization_config=DISCRETIZATION)
    run(sampler, v_oracle(randn(*SHAPE), calls), randn(*SHAPE))
    assert [c[0].shape[0] for c in calls] == [SHAPE[0], SHAPE[0]]


# guiders


def test_vanilla_cfg_with_scale_one_returns_the_cond_output():
    uncond, cond = randn(*SHAPE), randn(*SHAPE, seed=1)
    guided = VanillaCFG(1.0)(torch.cat([uncond, cond]), timestep=999)
    torch.testing.assert_close(guided, cond, rtol=0, atol=1e-6)
    torch.testing.assert_close(VanillaCFG(3.0)(torch.cat([uncond, cond]), 999), uncond + 3.0 * (cond - uncond))


def test_cfg_prepare_inputs_puts_uncond_first():
    x, alpha = randn(2, 3), torch.tensor([0.1, 0.2])
    cond = {"crossattn": torch.ones(2, 4), "num_frames": 13}
    uc = {"crossattn": torch.zeros(2, 4), "num_frames": 13}
    x2, alpha2, both = VanillaCFG(6.0).prepare_inputs(x, alpha, cond, uc)
    assert torch.equal(x2, torch.cat([x, x])) and torch.equal(alpha2, torch.cat([alpha, alpha]))
    assert torch.equal(both["crossattn"], torch.cat([uc["crossattn"], cond["crossattn"]]))
    assert both["num_frames"] == 13


def test_dynamic_cfg_uses_the_raw_timestep():
    guider = DynamicCFG(scale=6.0, exp=5, num_steps=50)
    assert guider.scale_at(0) == pytest.approx(7.0)  # (50 - 0) / 50 = 1: cos(pi) = -1
    assert guider.scale_at(50) == pytest.approx(1.0)  # ratio 0
    assert guider.scale_at(25) == pytest.approx(1 + 6.0 * (1 - np.cos(np.pi / 32)) / 2)
    for t in (999, 979, 519, 19):
        ratio = (50 - t) / 50
        assert guider.scale_at(t) == pytest.approx(1 + 3.0 * (1 - np.cos(np.pi * ratio**5)), rel=1e-12)
    uncond, cond = randn(*SHAPE), randn(*SHAPE, seed=1)
    torch.testing.assert_close(
        guider(torch.cat([uncond, cond]), 979), uncond + guider.scale_at(979) * (cond - uncond)
    )


@pytest.mark.parametrize("params, message", [
    ({"scale": 6.0, "exp": 2.5}, "guider_config.params.exp=2.5: expected an integer, e.g. 5"),
    ({"scale": float("nan"), "exp": 5}, "guider_config.params.scale=nan: expected a finite number"),
    ({"scale": "nan", "exp": 5}, "guider_config.params.scale='nan': expected a finite number"),
    ({"scale": float("inf"), "exp": 5}, "guider_config.params.scale=inf: expected a finite number"),
])
def test_guidance_needs_a_finite_scale_and_an_integer_exponent(params, message):
    with pytest.raises(ValueError) as error:
        DynamicCFG(num_steps=50, **params)
    assert str(error.value) == f"model.sampler_config.params.{message}"
    DynamicCFG(scale=6, exp=5.0, num_steps=50)  # 5.0 from a YAML file is an integer


@pytest.mark.parametrize("num_steps", [0, -2, 1001, 2.5])
def test_the_sampler_needs_one_to_num_timesteps_steps(num_steps):
    with pytest.raises(ValueError) as error:
        VideoDDIMSampler(num_steps=num_steps, discretization_config=DISCRETIZATION)
    assert str(error.value) == (f"model.sampler_config.params.num_steps={num_steps}: expected a whole number from 1 "
                                "to 1000")


def test_dynamic_cfg_and_sampler_must_agree_on_the_step_count():
    from satvideo.config import ConfigError

    guider = {"target": "satvideo.diffusion.DynamicCFG", "params": {"scale": 6, "exp": 5, "num_steps": 50}}
    with pytest.raises(ConfigError, match=r"^model.sampler_config.params.guider_config.params.num_steps=50 differs from "
                                          r"model.sampler_config.params.num_steps=10; set both$"):
        VideoDDIMSampler(num_steps=10, discretization_config=DISCRETIZATION, guider_config=guider)


@pytest.mark.parametrize("guider, guides", [
    (None, False),
    ({"target": "satvideo.diffusion.VanillaCFG", "params": {"scale": 1}}, False),
    ({"target": "satvideo.diffusion.VanillaCFG", "params": {"scale": 1.5}}, True),
    ({"target": "satvideo.diffusion.DynamicCFG", "params": {"scale": 0, "exp": 5, "num_steps": 4}}, False),
    ({"target": "satvideo.diffusion.DynamicCFG", "params": {"scale": 1, "exp": 5, "num_steps": 4}}, True),
])
def test_a_sampler_knows_whether_its_guidance_uses_the_unconditional_pass(guider, guides):
    sampler = VideoDDIMSampler(num_steps=4, discretization_config=DISCRETIZATION, guider_config=guider)
    assert sampler.guides() is guides


def test_prompts_longer_than_t5_reads_are_warned_of(caplog):
    from transformers import ByT5Tokenizer

    from satvideo.sampling import VideoRequest, warn_of_long_prompts

    requests = [VideoRequest(index=0, prompt="a" * 31, seed=0),  # 31 bytes and the end token: 32, all read
                VideoRequest(index=1, prompt="b" * 40, seed=0, negative_prompt="c" * 32)]
    tokenizer = ByT5Tokenizer()
    caplog.clear()
    warn_of_long_prompts(requests, (tokenizer, 32))
    assert [record.getMessage() for record in caplog.records if record.name == "satvideo.sampling.inputs"] == [
        f"request 1 ('{'b' * 40}'): its prompt is 41 tokens long; T5 reads the first 32, the rest has no effect",
        f"request 1 ('{'b' * 40}'): its negative prompt is 33 tokens long; T5 reads the first 32, the rest has no "
        "effect"]
    warn_of_long_prompts(requests, None)  # a conditioner without T5: nothing to count
