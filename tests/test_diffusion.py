"""The diffusion mathematics against the official fixture and against its own identities."""

from __future__ import annotations

import contextlib
import inspect
import math

import pytest
import torch

from ilvr_toolkit.cli import UsageError
from ilvr_toolkit.diffusion import (
    DiffusionConfig,
    GaussianDiffusion,
    GeneratorNoise,
    PerImageNoise,
    ReplayNoise,
    create_diffusion,
    ddim_sample,
    ddpm_sample,
    diffuse_to,
    get_named_beta_schedule,
    space_timesteps,
)
from ilvr_toolkit.sampling import SamplerSpec


def test_respacing_10_matches_fixture(ref_record):
    respaced = ref_record["respaced"]
    diffusion = create_diffusion(DiffusionConfig(timestep_respacing="10"))
    assert diffusion.timestep_map.tolist() == list(respaced["timestep_map"])
    for name in ("betas", "alphas_cumprod", "posterior_log_variance_clipped"):
        diff = (diffusion.table(name) - respaced[name]).abs().max().item()
        print(f"respaced {name}: max abs diff {diff:.3e}")
        assert diff <= 1e-10


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("10", [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]),
        ("ddim10", list(range(0, 1000, 100))),
        ("2,1", [0, 499, 500]),
        ("", list(range(1000))),
    ],
)
def test_space_timesteps_sections(spec, expected):
    assert space_timesteps(1000, spec) == expected


def test_space_timesteps_rejects_impossible():
    with pytest.raises(ValueError):
        space_timesteps(10, "20")
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim999")


@pytest.mark.parametrize(
    "spec", ["ddim 50", " 10 , 20 ", "10,0", "0", "ddim", "ddim10,20", "-5", "1e3", "abc"]
)
def test_sample_and_train_options_read_a_respacing_alike(spec):
    """``--sampler.respacing`` and ``--model.diffusion.timestep_respacing`` used to be checked by two
    rules (a regex, ``space_timesteps``): "ddim 50" refused by one, "10,0" by the other only."""
    try:
        SamplerSpec("ddim", spec)
    except UsageError as error:
        refused = str(error).startswith(f"--sampler.respacing {spec!r}: expected step counts")
    else:
        refused = False
    with contextlib.suppress(UsageError):
        DiffusionConfig(timestep_respacing=spec).check_training_settings()
        assert not refused, spec
        return
    assert refused, spec


def test_ddim_with_a_space_is_ddim():
    """``ddim 50`` (sampler ddim) keeps what ``ddim50`` keeps: 50 steps of stride 20."""
    spec = SamplerSpec("ddim", "ddim 50")
    config = DiffusionConfig(steps=1000)
    kept = create_diffusion(config, respacing=spec.respacing).timestep_map.tolist()
    assert (
        kept == create_diffusion(config, respacing="ddim50").timestep_map.tolist() == list(range(0, 1000, 20))
    )


def test_schedules_float64_and_guided_diffusion_values():
    linear = get_named_beta_schedule("linear", 1000)
    assert linear.dtype == torch.float64
    assert linear[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert linear[-1].item() == pytest.approx(0.02, abs=1e-15)
    cosine = get_named_beta_schedule("cosine", 1000)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert cosine[0].item() == pytest.approx(1 - f(1 / 1000) / f(0), rel=1e-12)
    assert cosine.max().item() <= 0.999
    with pytest.raises(ValueError):
        get_named_beta_schedule("quadratic", 10)


def test_respacing_that_keeps_every_step_equals_base():
    base = create_diffusion(DiffusionConfig(steps=50))
    kept = create_diffusion(DiffusionConfig(steps=50), respacing="50")
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped"):
        torch.testing.assert_close(base.table(name), kept.table(name), rtol=0, atol=1e-15)
    assert kept.timestep_map.tolist() == list(range(50))


def test_respaced_alpha_bar_kept_at_kept_steps():
    config = DiffusionConfig(steps=200, noise_schedule="cosine")
    base = create_diffusion(config)
    spaced = create_diffusion(config, respacing="ddim20")
    torch.testing.assert_close(
        spaced.table("alphas_cumprod"), base.table("alphas_cumprod")[spaced.timestep_map], rtol=1e-12, atol=0
    )


class _FakeNet(torch.nn.Module):
    """A deterministic network: a fixed mixing of x and t with 2C output channels."""

    def __init__(self, channels: int = 3, learn_sigma: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        out = 2 * channels if learn_sigma else channels
        self.conv = torch.nn.Conv2d(channels, out, 3, padding=1)
        self.seen_t: list[torch.Tensor] = []

    def forward(self, x, t):
        self.seen_t.append(t.clone())
        return torch.tanh(self.conv(x) + (t.float() / 1000.0).view(-1, 1, 1, 1))


def test_network_receives_original_timesteps():
    diffusion = create_diffusion(DiffusionConfig(steps=100), respacing="5")
    net = _FakeNet()
    x_T = torch.randn(2, 3, 8, 8)
    ddpm_sample(diffusion, net, x_T, noise=GeneratorNoise(torch.Generator().manual_seed(0)))
    seen = [t[0].item() for t in net.seen_t]
    assert seen == list(reversed(diffusion.timestep_map.tolist()))
    assert all(t.dtype == torch.long for t in net.seen_t)


def test_samplers_signature_and_docstring_show_model_kwargs():
    for sampler in (ddpm_sample, ddim_sample):
        signature = inspect.signature(sampler)
        assert list(signature.parameters)[-2:] == ["start_index", "model_kwargs"]
        parameter = signature.parameters["model_kwargs"]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is None
        assert "``model_kwargs``" in sampler.__doc__
        with pytest.raises(TypeError, match="model_kwarg"):  # the signature is what the call accepts
            signature.bind(None, None, None, noise=None, model_kwarg={})


def test_samplers_pass_model_kwargs_to_the_network():
    """``model_kwargs`` (guided-diffusion's, public since 0.1) reaches every network call of both loops."""
    diffusion = create_diffusion(DiffusionConfig(steps=100), respacing="4")
    seen = []

    def net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(y)
        return torch.zeros(x.shape[0], 6, *x.shape[2:])

    y = torch.tensor([3, 5])
    noise = GeneratorNoise(torch.Generator().manual_seed(0))
    ddpm_sample(diffusion, net, torch.randn(2, 3, 8, 8), noise=noise, model_kwargs={"y": y})
    ddim_sample(diffusion, net, torch.randn(2, 3, 8, 8), noise=noise, model_kwargs={"y": y}, start_index=2)
    assert len(seen) == 4 + 3 and all(v is y for v in seen)


def test_ddim_eta0_is_deterministic_and_draws_nothing():
    diffusion = create_diffusion(DiffusionConfig(steps=100), respacing="ddim10")
    net = _FakeNet()
    x_T = torch.randn(2, 3, 8, 8)
    replay = ReplayNoise([])
    a = ddim_sample(diffusion, net, x_T, noise=replay, eta=0.0)
    b = ddim_sample(diffusion, net, x_T, noise=ReplayNoise([]), eta=0.0)
    assert torch.equal(a, b)
    assert replay.position == 0


def test_ddim_eta1_has_posterior_variance():
    diffusion = create_diffusion(DiffusionConfig(steps=1000), respacing="50")
    t = torch.arange(1, 50)
    ab = diffusion.table("alphas_cumprod")[t]
    ab_prev = diffusion.table("alphas_cumprod_prev")[t]
    sigma2 = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    torch.testing.assert_close(sigma2, diffusion.table("posterior_variance")[t], rtol=1e-10, atol=0)


def test_ddim_eta1_sample_uses_posterior_std():
    """One DDIM step with eta = 1 and one DDPM step (fixed-small) agree for the same noise."""
    config = DiffusionConfig(steps=100, learn_sigma=False, sigma_small=True)
    diffusion = create_diffusion(config, respacing="10")
    net = _FakeNet(learn_sigma=False)
    x_T = torch.randn(1, 3, 8, 8)
    draws = [torch.randn(1, 3, 8, 8) for _ in range(10)]
    ddim = ddim_sample(diffusion, net, x_T, noise=ReplayNoise(draws), eta=1.0)
    ddpm = ddpm_sample(diffusion, net, x_T, noise=ReplayNoise(draws))
    torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-5)


def test_clip_denoised_of_the_config_reaches_both_samplers():
    """``clip_denoised`` (a training and a guided-diffusion flag) is honoured by the samplers; an
    explicit argument still wins."""
    net = _FakeNet()
    x_T = torch.randn(2, 3, 8, 8) * 3  # far outside [-1, 1]: the x_0 predictions need clipping
    runs = {}
    for clip in (True, False):
        diffusion = create_diffusion(DiffusionConfig(steps=100, clip_denoised=clip), respacing="5")
        assert diffusion.clip_denoised is clip
        noise = GeneratorNoise(torch.Generator().manual_seed(0))
        runs[clip, "ddpm"] = ddpm_sample(diffusion, net, x_T, noise=noise)
        runs[clip, "ddim"] = ddim_sample(diffusion, net, x_T, noise=noise)
    assert not torch.equal(runs[True, "ddpm"], runs[False, "ddpm"])
    assert not torch.equal(runs[True, "ddim"], runs[False, "ddim"])
    unclipped = create_diffusion(DiffusionConfig(steps=100, clip_denoised=False), respacing="5")
    noise = GeneratorNoise(torch.Generator().manual_seed(0))
    assert torch.equal(ddpm_sample(unclipped, net, x_T, noise=noise, clip_denoised=True), runs[True, "ddpm"])


@pytest.mark.parametrize("eta", [1.5, -0.5, float("nan")])
def test_ddim_refuses_eta_outside_0_1(eta):
    diffusion = create_diffusion(DiffusionConfig(steps=100), respacing="5")
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
        ddim_sample(diffusion, _FakeNet(), torch.randn(1, 3, 8, 8), noise=ReplayNoise([]), eta=eta)


def test_diffuse_to_refuses_an_index_outside_the_process():
    """A negative index used to wrap to the last step, 2.5 to step 2."""
    diffusion = create_diffusion(DiffusionConfig(steps=100), respacing="10")
    y, noise = torch.zeros(1, 3, 4, 4), GeneratorNoise(torch.Generator().manual_seed(0))
    for index in (-1, 10):
        with pytest.raises(ValueError, match=rf"index {index} outside \[0, 9\]"):
            diffuse_to(diffusion, y, index, noise)
    with pytest.raises(TypeError):
        diffuse_to(diffusion, y, 2.5, noise)
    assert diffuse_to(diffusion, y, 9, noise).shape == y.shape


def test_timestep_map_must_match_the_betas():
    with pytest.raises(ValueError, match="timestep_map has 3 entries for 4 betas"):
        GaussianDiffusion(torch.full((4,), 0.1), timestep_map=[0, 1, 2])


def _losses(diffusion: GaussianDiffusion, seed: int = 0):
    net = _FakeNet()
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    t = torch.tensor([0, 10, 250, 499])
    noise = torch.randn(4, 3, 8, 8, generator=g)
    return diffusion.training_losses(net, x0, t, noise=noise)


def test_hybrid_loss_terms():
    terms = _losses(create_diffusion(DiffusionConfig()))
    assert set(terms) == {"loss", "mse", "vb"}
    assert all(v.shape == (4,) for v in terms.values())
    assert (terms["vb"] >= 0).all()
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_vb_gradient_reaches_only_the_variance_channels():
    diffusion = create_diffusion(DiffusionConfig())
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    out = torch.zeros(2, 6, 8, 8, requires_grad=True)
    terms = diffusion.training_losses(lambda x, t: out, x0, torch.tensor([3, 700]))
    terms["vb"].sum().backward()
    assert out.grad[:, :3].abs().max() == 0
    assert out.grad[:, 3:].abs().max() > 0


def test_p2_gamma_zero_is_no_weighting_and_gamma_one_downweights_low_t():
    plain = _losses(create_diffusion(DiffusionConfig()))
    gamma0 = _losses(create_diffusion(DiffusionConfig(p2_gamma=0.0, p2_k=5.0)))
    torch.testing.assert_close(plain["loss"], gamma0["loss"], rtol=0, atol=0)
    gamma1 = _losses(create_diffusion(DiffusionConfig(p2_gamma=1.0, p2_k=1.0)))
    diffusion = create_diffusion(DiffusionConfig())
    t = torch.tensor([0, 10, 250, 499])
    snr = diffusion.table("snr")[t].float()
    torch.testing.assert_close(gamma1["mse"], plain["mse"] / (1.0 + snr), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gamma1["vb"], plain["vb"])


def test_rescaled_vb_and_kl_loss():
    base = _losses(create_diffusion(DiffusionConfig(steps=500)))
    rescaled = _losses(create_diffusion(DiffusionConfig(steps=500, rescale_learned_sigmas=True)))
    torch.testing.assert_close(rescaled["vb"], base["vb"] * 0.5)
    kl = create_diffusion(DiffusionConfig(use_kl=True))
    terms = _losses(kl)
    assert set(terms) == {"loss", "vb"}


def test_fixed_variance_channel_mismatch_is_named():
    diffusion = create_diffusion(DiffusionConfig(learn_sigma=False))
    with pytest.raises(ValueError, match="learn_sigma"):
        diffusion.p_mean_variance(_FakeNet(learn_sigma=True), torch.zeros(1, 3, 8, 8), torch.tensor([3]))


def test_per_image_noise_independent_of_batch():
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = PerImageNoise(gens([1, 2, 3]))((3, 3, 4, 4), torch.device("cpu"), torch.float32)
    single = PerImageNoise(gens([2]))((1, 3, 4, 4), torch.device("cpu"), torch.float32)
    assert torch.equal(batch[1:2], single)


def test_pinned_sums_of_a_full_tiny_loop():
    """Pins the numbers of a whole DDPM + DDIM loop so that a silent change in the math fails."""
    diffusion = create_diffusion(DiffusionConfig(steps=1000), respacing="20")
    net = _FakeNet()
    g = torch.Generator().manual_seed(1234)
    noise = GeneratorNoise(g)
    x_T = noise((2, 3, 8, 8), torch.device("cpu"), torch.float32)
    ddpm = ddpm_sample(diffusion, net, x_T, noise=noise)
    ddim = ddim_sample(diffusion, net, x_T, noise=noise, eta=0.5)
    values = [ddpm.sum().item(), ddpm.abs().mean().item(), ddim.sum().item(), ddim.abs().mean().item()]
    print("pinned:", values)
    expected = PINNED
    for got, want in zip(values, expected, strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


PINNED = [-39.35393524169922, 0.7072970867156982, -56.43986129760742, 0.85921710729599]
