"""ILVR against the official code's recorded run, and the paper-mode timestep."""

from __future__ import annotations

import pytest
import torch

from ilvr_toolkit.conditioning import (
    ILVR,
    LowPass,
    Projection,
    reference_index,
    resize_matrix,
    resolve_range_t,
)
from ilvr_toolkit.diffusion import (
    DiffusionConfig,
    GeneratorNoise,
    ReplayNoise,
    Step,
    create_diffusion,
    ddim_sample,
    ddpm_sample,
)
from ilvr_toolkit.models import get_preset


def test_resizer_matrices_match_fixture(ref_record):
    worst = 0.0
    for key, matrices in ref_record["resizer_matrices"].items():
        size, factor = (int(v) for v in key.split("_N"))
        down = resize_matrix(size, size // factor)
        up = resize_matrix(size // factor, size)
        worst = max(worst, (down - matrices["down"].double()).abs().max().item())
        worst = max(worst, (up - matrices["up"].double()).abs().max().item())
    print(f"resizer matrices: max abs diff {worst:.3e} over {len(ref_record['resizer_matrices'])} (size, N)")
    assert worst <= 1e-6


def test_lowpass_matches_fixture_lowpass(ref_record):
    lowpass = LowPass(32, ref_record["down_N"])
    diff = (lowpass(ref_record["ref_img"]) - ref_record["lowpass_ref"]).abs().max().item()
    assert diff <= 1e-5


def test_lowpass_any_divisor_and_rejects_non_divisor():
    x = torch.randn(2, 3, 48, 48)
    assert LowPass(48, 3)(x).shape == x.shape
    assert LowPass(48, 1)(x).sub(x).abs().max() < 1e-5  # N = 1 is the identity
    with pytest.raises(ValueError, match="divisor"):
        LowPass(48, 5)
    with pytest.raises(
        TypeError, match=r"LowPass: factor=4.0 must be an int \(factor N: a divisor of image_size"
    ):
        LowPass(32, 4.0)
    with pytest.raises(TypeError, match=r"LowPass: image_size='32' must be an int"):
        LowPass("32", 4)


def test_lowpass_is_not_idempotent_but_close():
    lowpass = LowPass(32, 4)
    down_up = lowpass.down_matrix @ lowpass.up_matrix
    assert (down_up - torch.eye(8)).abs().max() > 1e-3


def _replay(tiny32, record, mode):
    diffusion = create_diffusion(DiffusionConfig(timestep_respacing="10"))
    noise = ReplayNoise(record["rng_draws"])
    x_T = noise((2, 3, 32, 32), torch.device("cpu"), torch.float32)
    steps = []
    hooks = [
        ILVR(record["ref_img"], record["down_N"], record["range_t"], mode),
        lambda s: steps.append(s.x_prev),
    ]
    out = ddpm_sample(diffusion, tiny32, x_T, noise=noise, hooks=hooks)
    return out, steps, noise


def test_official_mode_replays_fixture(tiny32, ref_record):
    out, steps, noise = _replay(tiny32, ref_record, "official")
    assert noise.remaining == 0
    worst = 0.0
    for got, want in zip(steps, ref_record["steps"], strict=True):
        worst = max(worst, (got - want["sample"]).abs().max().item())
    final = (out - ref_record["output"]).abs().max().item()
    print(f"ILVR replay (official mode): max step diff {worst:.3e}, output diff {final:.3e}")
    assert worst <= 1e-4
    assert final <= 1e-4


def test_unconditional_same_seed_matches_fixture(tiny32, ref_record):
    diffusion = create_diffusion(DiffusionConfig(timestep_respacing="10"))
    noise = GeneratorNoise(torch.Generator().manual_seed(ref_record["seeds"]["sample_global_manual_seed"]))
    x_T = noise((2, 3, 32, 32), torch.device("cpu"), torch.float32)
    out = ddpm_sample(diffusion, tiny32, x_T, noise=noise)
    diff = (out - ref_record["output_unconditional_same_seed"]).abs().max().item()
    print(f"unconditional DDPM vs fixture: max abs diff {diff:.3e}")
    assert diff <= 1e-4


def test_paper_mode_uses_next_lower_kept_timestep():
    diffusion = create_diffusion(DiffusionConfig(steps=1000), respacing="10")
    seen: list[tuple[int, float]] = []

    class Spy:
        timestep_map, num_timesteps = diffusion.timestep_map, diffusion.num_timesteps

        def q_sample(self, x, t, noise):
            seen.append((int(t[0]), diffusion.timestep_map[t[0]].item()))
            return diffusion.q_sample(x, t, noise)

    ref = torch.zeros(1, 3, 16, 16)
    hook = ILVR(ref, 4, range_t=0, mode="paper")
    noise = GeneratorNoise(torch.Generator().manual_seed(0))
    for i in (9, 5, 1):
        step = Step(
            i,
            diffusion.timestep_map[i].item(),
            diffusion.timestep_map[i - 1].item(),
            ref,
            ref.clone(),
            ref,
            Spy(),
            noise,
        )  # type: ignore[arg-type]
        hook(step)
    assert seen == [(8, 888), (4, 444), (0, 0)]
    assert reference_index(9, "official") == 9 and reference_index(9, "paper") == 8


def test_paper_mode_final_step_uses_clean_reference():
    diffusion = create_diffusion(DiffusionConfig(steps=100), respacing="5")
    ref = torch.rand(1, 3, 16, 16) * 2 - 1
    x = torch.randn(1, 3, 16, 16)
    hook = ILVR(ref, 2, range_t=-1, mode="paper")
    step = Step(0, 0, -1, x, x, x, diffusion, ReplayNoise([]))
    out = hook(step)  # an empty replay source: drawing noise here would raise
    lowpass = LowPass(16, 2)
    torch.testing.assert_close(out, x - lowpass(x) + lowpass(ref), atol=1e-5, rtol=0)


def test_range_resolution():
    timestep_map = list(range(0, 1000, 100))
    assert resolve_range_t(timestep_map) == 0
    assert resolve_range_t(timestep_map, range_t=3) == 3
    assert resolve_range_t(timestep_map, fraction=1.0) == -1
    assert resolve_range_t(timestep_map, fraction=0.5) == 4  # indices 9..5 conditioned
    assert resolve_range_t(timestep_map, fraction=0.29) == 6  # round(2.9) = 3 steps: indices 9..7
    assert resolve_range_t(timestep_map, fraction=0.25) == 7  # round(2.5) = 2: a tie goes to the even count
    assert resolve_range_t(timestep_map, stop_timestep=450) == 4  # t = 900..500 conditioned
    with pytest.raises(ValueError):
        resolve_range_t(timestep_map, range_t=2, fraction=0.5)


def test_hook_works_under_ddim_and_pulls_lowpass_to_reference(tiny32):
    diffusion = create_diffusion(DiffusionConfig(), respacing="ddim10")
    ref = torch.rand(2, 3, 32, 32) * 2 - 1
    noise = GeneratorNoise(torch.Generator().manual_seed(3))
    x_T = noise((2, 3, 32, 32), torch.device("cpu"), torch.float32)
    conditioned = ddim_sample(diffusion, tiny32, x_T, noise=noise, hooks=[ILVR(ref, 4, range_t=-1)])
    free = ddim_sample(diffusion, tiny32, x_T, noise=GeneratorNoise(torch.Generator().manual_seed(3)))
    lowpass = LowPass(32, 4)
    assert (lowpass(conditioned) - lowpass(ref)).abs().mean() < 0.5 * (
        lowpass(free) - lowpass(ref)
    ).abs().mean()


def test_tiny32_preset_builds():
    assert get_preset("tiny32").image_size == 32


def _zeros(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape[0], 6, *x.shape[2:])


def _noise() -> GeneratorNoise:
    return GeneratorNoise(torch.Generator().manual_seed(0))


def test_a_hook_used_with_two_respacings_resolves_its_range_for_each():
    """A Projection's fraction/stop_timestep is resolved against each diffusion it samples (it
    used to keep the first one's), and a range_t given directly is checked against it."""
    y = torch.rand(1, 3, 8, 8) * 2 - 1
    hook = Projection(y, LowPass(8, 2), fraction=0.5)
    seen = []
    for respacing, want in (("10", 4), ("20", 9)):
        diffusion = create_diffusion(DiffusionConfig(steps=100), respacing=respacing)
        ddpm_sample(diffusion, _zeros, torch.randn(1, 3, 8, 8), noise=_noise(), hooks=[hook])
        seen.append((hook.range_t, want))
    assert [got for got, _ in seen] == [want for _, want in seen]
    diffusion = create_diffusion(DiffusionConfig(steps=100), respacing="10")
    for bad in (10, -2):
        with pytest.raises(ValueError, match=f"range_t={bad} outside"):
            ddpm_sample(diffusion, _zeros, torch.randn(1, 3, 8, 8), noise=_noise(), hooks=[ILVR(y, 2, bad)])


def test_a_reference_that_cannot_be_one_is_named():
    """uint8 images used to give samples in 75..175; a wrong size a bare broadcast error."""
    y = torch.rand(2, 3, 8, 8) * 2 - 1
    with pytest.raises(TypeError, match=r"reference: expected a float tensor .* got torch.uint8"):
        ILVR(((y + 1) * 127.5).to(torch.uint8), 2)
    with pytest.raises(ValueError, match=r"reference: expected \(B, C, H, W\), got shape \(3, 8, 8\)"):
        Projection(y[0], LowPass(8, 2))
    with pytest.raises(TypeError, match="operator: expected a torch.nn.Module"):
        Projection(y, lambda v: v)
    diffusion = create_diffusion(DiffusionConfig(steps=100), respacing="4")
    for other in (y[:1], y[:, :1], torch.zeros(2, 3, 16, 16)):
        hook = Projection(other, LowPass(other.shape[-1], 2))
        with pytest.raises(ValueError, match=r"reference: shape \(.*\), the samples' is \(2, 3, 8, 8\)"):
            ddpm_sample(diffusion, _zeros, torch.randn(2, 3, 8, 8), noise=_noise(), hooks=[hook])
