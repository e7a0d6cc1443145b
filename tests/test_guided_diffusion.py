"""guided-diffusion checkpoints from their README flags: parsing, the six released layouts,
the diffusion flags (checked against guided-diffusion's equations redone in numpy) and
class-conditional translation through sample.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ilvr_toolkit.diffusion import DiffusionConfig, create_diffusion
from ilvr_toolkit.flags import resolve_flags
from ilvr_toolkit.models import (
    PRESET_FLAGS,
    UNetConfig,
    build_unet,
    get_preset,
    load_model,
    parse_flags,
    save_plain_state_dict,
)
from ilvr_toolkit.sampling.cli import main

GD_REFERENCE = Path(__file__).parent / "fixtures" / "guided_diffusion"  # copied from shared/reference
FAMILIES = {  # reference file -> the presets that carry its flags
    "imagenet64_cond": ["imagenet64_cond"],
    "imagenet128_cond": ["imagenet128_cond"],
    "imagenet256_cond": ["imagenet256_cond"],
    "imagenet256_uncond": ["imagenet256_uncond"],
    "imagenet512_cond": ["imagenet512_cond"],
    "lsun256": ["lsun_bedroom", "lsun_cat", "lsun_horse"],
}
# A tiny class-conditional cosine model with x_0 prediction and rescaled timesteps: 30 steps,
# so the network sees t * 1000 / 30 (not an integer), respaced to 6 steps.
TINY_FLAGS = (
    'MODEL_FLAGS="--image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 '
    '--attention_resolutions 8 --num_head_channels 32 --class_cond True --learn_sigma True" '
    'DIFFUSION_FLAGS="--diffusion_steps 30 --noise_schedule cosine --predict_xstart True '
    '--rescale_timesteps True" SAMPLE_FLAGS="--timestep_respacing 6 --batch_size 4"'
)
# space_timesteps(30, "6") worked out by hand: stride 29 / 5 = 5.8, rounded positions.
TINY_KEPT = [0, 6, 12, 17, 23, 29]


def _family(name: str) -> dict:
    return json.loads((GD_REFERENCE / f"{name}.json").read_text())


# --------------------------------------------------------------------------- flags
def test_parse_flags_types_and_readme_shapes():
    flags = parse_flags(TINY_FLAGS + " --dropout=0.1 --use_ddim yes --num_heads_upsample -1")
    assert flags["image_size"] == 16 and flags["channel_mult"] == (1, 2)
    assert flags["attention_resolutions"] == (8,) and flags["class_cond"] is True
    assert flags["diffusion_steps"] == 30 and flags["noise_schedule"] == "cosine"
    assert flags["dropout"] == 0.1 and flags["use_ddim"] is True and flags["num_heads_upsample"] == -1
    assert flags["timestep_respacing"] == "6" and flags["batch_size"] == 4
    assert parse_flags("--attention_resolutions 32,16,8 --timestep_respacing ddim25") == {
        "attention_resolutions": (32, 16, 8),
        "timestep_respacing": "ddim25",
    }
    assert parse_flags("") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("--num_channel 64", "--num_channel.*did you mean --num_channels"),
        ("--noise_shedule cosine", "did you mean --noise_schedule"),
        ("--class_cond maybe", "--class_cond"),
        ("--num_res_blocks two", "--num_res_blocks: expected int"),
        ("--image_size", "has no value"),
        ("64 --image_size", "expected a --flag"),
    ],
)
def test_parse_flags_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_flags(text)


def test_script_defaults_are_guided_diffusions():
    config = DiffusionConfig.from_guided_diffusion_flags("")
    assert (config.steps, config.noise_schedule, config.timestep_respacing) == (1000, "linear", "")
    assert not (config.learn_sigma or config.sigma_small or config.use_kl or config.predict_xstart)
    assert not (config.rescale_timesteps or config.rescale_learned_sigmas)
    unet = UNetConfig.from_guided_diffusion_flags({})
    assert (unet.image_size, unet.num_channels, unet.num_res_blocks, unet.num_heads) == (64, 128, 2, 4)
    assert unet.attention_resolutions == (16, 8) and unet.channel_mult == (1, 2, 3, 4)
    assert unet.use_scale_shift_norm and not (unet.resblock_updown or unet.learn_sigma)
    assert unet.num_classes is None and unet.num_head_channels == -1
    with pytest.raises(ValueError, match="did you mean --learn_sigma"):
        UNetConfig.from_guided_diffusion_flags({"learn_sigmas": True})


@pytest.mark.parametrize(
    ("flags", "variance", "use_kl", "rescale_learned_sigmas"),
    [
        ("", "fixed_large", False, False),
        ("--sigma_small True", "fixed_small", False, False),
        ("--learn_sigma True --use_kl True", "learned_range", True, False),
        ("--learn_sigma True --rescale_learned_sigmas True", "learned_range", False, True),
    ],
)
def test_variance_and_loss_flags(flags, variance, use_kl, rescale_learned_sigmas):
    diffusion = create_diffusion(DiffusionConfig.from_guided_diffusion_flags(flags + " --diffusion_steps 40"))
    assert diffusion.variance == variance and diffusion.num_timesteps == 40
    assert (diffusion.use_kl, diffusion.rescale_learned_sigmas) == (use_kl, rescale_learned_sigmas)
    x0, t = torch.rand(2, 3, 4, 4) * 2 - 1, torch.tensor([5, 30])
    channels = 6 if variance == "learned_range" else 3
    losses = diffusion.training_losses(
        lambda x, t: torch.zeros(2, channels, 4, 4), x0, t, noise=torch.ones_like(x0)
    )
    if variance == "learned_range":  # the bound of the plain hybrid loss, per example
        plain = create_diffusion(DiffusionConfig(steps=40, learn_sigma=True))
        vb = plain.training_losses(lambda x, t: torch.zeros(2, 6, 4, 4), x0, t, noise=torch.ones_like(x0))[
            "vb"
        ]
        if use_kl:  # guided-diffusion's RESCALED_KL: the bound times T
            torch.testing.assert_close(losses["loss"], vb * 40)
        else:  # RESCALED_MSE: the bound times T / 1000
            torch.testing.assert_close(losses["vb"], vb * 40 / 1000)


def test_diffusion_config_from_dict_refuses_unknown_keys():
    with pytest.raises(ValueError, match="key diffusion_steps "):
        DiffusionConfig.from_dict({"diffusion_steps": 50})
    config = DiffusionConfig(steps=50, predict_xstart=True, rescale_timesteps=True)
    assert DiffusionConfig.from_dict(config.to_dict()) == config


# --------------------------------------------------------------------------- released families
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_released_family_layout_from_flags(family):
    ref = _family(family)
    config = UNetConfig.from_guided_diffusion_flags(ref["flags"])
    shapes = {k: list(v.shape) for k, v in build_unet(config, device="meta").state_dict().items()}
    assert list(shapes) == list(ref["state_dict"]) and shapes == ref["state_dict"]
    assert len(shapes) == ref["num_keys"]
    assert sum(math.prod(s) for s in shapes.values()) == ref["num_parameters"]
    assert list(config.channel_mult) == ref["channel_mult_resolved"]
    assert list(config.attention_ds) == ref["attention_ds_resolved"]
    assert config.num_classes == ref["num_classes"]
    resolved = resolve_flags(ref["flags"])  # every default explicit, as recorded
    for key, value in ref["config"].items():
        want = (
            tuple(int(v) for v in value.split(",") if v)
            if key in ("attention_resolutions", "channel_mult")
            else value
        )
        assert resolved[key] == want, key
    diffusion = DiffusionConfig.from_guided_diffusion_flags(ref["flags"])
    assert (diffusion.steps, diffusion.noise_schedule) == (1000, ref["config"]["noise_schedule"])
    assert diffusion.learn_sigma and not diffusion.predict_xstart and not diffusion.rescale_timesteps
    for preset in FAMILIES[family]:
        assert PRESET_FLAGS[preset] == ref["flags"] and get_preset(preset) == config


def test_released_float32_file_with_use_fp16_loads_as_float32(tmp_path):
    """use_fp16 True (imagenet64 flags' last model flags): the file is float32, so is the model."""
    flags = TINY_FLAGS + " --use_fp16 True"
    model = build_unet(UNetConfig.from_guided_diffusion_flags(flags))
    save_plain_state_dict(tmp_path / "m.pt", model)
    loaded = load_model(tmp_path / "m.pt", flags=flags)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert loaded.diffusion == DiffusionConfig.from_guided_diffusion_flags(TINY_FLAGS).to_dict()
    assert load_model(tmp_path / "m.pt", preset=loaded.unet_config).diffusion == {}


# --------------------------------------------------------------------------- the diffusion flags
def _tiny_model(seed: int = 0) -> torch.nn.Module:
    """The tiny model with random (not zero-initialised) weights, so every output matters."""
    model = build_unet(UNetConfig.from_guided_diffusion_flags(TINY_FLAGS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def _by_hand(index: int, x_t: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One reverse step's mean and log-variance from guided-diffusion's equations, float64:
    cosine alpha_bar (Nichol & Dhariwal eq. 17, beta capped at 0.999), respaced betas
    1 - alpha_bar_k / alpha_bar_{k-1}, model output = (x_0, v), learned-range variance."""
    f = [math.cos((t / 30 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(31)]
    betas = np.array([min(1 - f[t + 1] / f[t], 0.999) for t in range(30)])
    alpha_bar = np.cumprod(1 - betas)[TINY_KEPT]
    alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
    beta = 1 - alpha_bar / alpha_bar_prev
    a, a_prev, b = alpha_bar[index], alpha_bar_prev[index], beta[index]
    posterior_var = b * (1 - a_prev) / (1 - a)
    x0 = np.clip(out[:, :3], -1, 1)
    mean = b * math.sqrt(a_prev) / (1 - a) * x0 + (1 - a_prev) * math.sqrt(1 - b) / (1 - a) * x_t
    frac = (out[:, 3:] + 1) / 2
    return mean, frac * math.log(b) + (1 - frac) * math.log(posterior_var)


def test_one_reverse_step_matches_the_equations(tmp_path):
    model = _tiny_model()
    save_plain_state_dict(tmp_path / "tiny.pt", model)
    loaded = load_model(tmp_path / "tiny.pt", flags=TINY_FLAGS)
    diffusion = create_diffusion(DiffusionConfig.from_dict(loaded.diffusion))
    assert diffusion.timestep_map.tolist() == TINY_KEPT
    x_t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([3, 999])
    seen = []

    def net(x, t, y):
        seen.append(t)
        return loaded.model(x, t, y)

    for index in (3, 1):
        with torch.no_grad():
            got = diffusion.p_mean_variance(net, x_t, torch.full((2,), index), model_kwargs={"y": y})
        fed = float(np.float32(TINY_KEPT[index]) * np.float32(1000 / 30))  # 566.67 and 200.0
        assert seen[-1].dtype == torch.float32 and seen[-1].tolist() == [fed, fed]
        with torch.no_grad():
            out = model(x_t, torch.full((2,), fed), y).double().numpy()  # the network, called by hand
        mean, log_var = _by_hand(index, x_t.double().numpy(), out)
        np.testing.assert_allclose(got["mean"].numpy(), mean, atol=2e-6, rtol=0)
        np.testing.assert_allclose(got["log_variance"].numpy(), log_var, atol=2e-6, rtol=0)
        np.testing.assert_allclose(got["pred_xstart"].numpy(), np.clip(out[:, :3], -1, 1), atol=1e-6)
    assert seen[0][0].item() != round(seen[0][0].item())  # 17 * 1000 / 30: not an integer


def test_predict_xstart_training_target():
    diffusion = create_diffusion(DiffusionConfig(steps=30, learn_sigma=False, predict_xstart=True))
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    losses = diffusion.training_losses(lambda x, t: torch.zeros_like(x), x0, torch.tensor([0, 29]))
    torch.testing.assert_close(losses["mse"], (x0**2).mean(dim=(1, 2, 3)))


# --------------------------------------------------------------------------- sample.py
def _refs(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "owl"):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def _sample(tmp_path: Path, checkpoint: Path, out: str, *extra: str) -> int:
    args = ["--model.checkpoint", str(checkpoint), "--references", str(tmp_path / "refs"), "--device", "cpu"]
    args += [
        "--output.dir",
        str(tmp_path / out),
        "--progress",
        "false",
        "--batch_size",
        "2",
        "--ilvr.factor",
        "4",
    ]
    return main([*args, *extra])


def test_class_conditional_translation(tmp_path, capsys):
    _refs(tmp_path / "refs")
    save_plain_state_dict(tmp_path / "tiny.pt", _tiny_model())
    (tmp_path / "labels.txt").write_text("# name label\ncat 281\ndog, 207\nowl 24\n")
    flags = ["--model.flags", TINY_FLAGS]
    assert (
        _sample(
            tmp_path, tmp_path / "tiny.pt", "file", *flags, "--class_labels", str(tmp_path / "labels.txt")
        )
        == 0
    )
    manifest = json.loads((tmp_path / "file" / "manifest.json").read_text())
    assert manifest["timestep_map"] == TINY_KEPT  # the flags' --timestep_respacing 6
    assert manifest["diffusion"]["noise_schedule"] == "cosine" and manifest["diffusion"]["steps"] == 30
    assert manifest["diffusion"]["predict_xstart"] and manifest["diffusion"]["rescale_timesteps"]
    assert manifest["config"]["class_labels"] == [281, 207, 24]
    file_run = {p.name: np.asarray(Image.open(p)) for p in (tmp_path / "file").glob("*_s0.png")}
    assert sorted(file_run) == ["cat_s0.png", "dog_s0.png", "owl_s0.png"]
    # the same labels as a list give the same images; other labels change them
    assert _sample(tmp_path, tmp_path / "tiny.pt", "list", *flags, "--class_labels", "[281, 207, 24]") == 0
    for name, image in file_run.items():
        assert np.array_equal(np.asarray(Image.open(tmp_path / "list" / name)), image)
    assert _sample(tmp_path, tmp_path / "tiny.pt", "one", *flags, "--class_labels", "5") == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "one" / "cat_s0.png")), file_run["cat_s0.png"])
    capsys.readouterr()
    made = {p: p.read_bytes() for p in (tmp_path / "one").glob("*.png")}
    assert _sample(tmp_path, tmp_path / "tiny.pt", "one", *flags, "--class_labels", "6") == 2  # a rerun
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"sample.py: error: --class_labels [6, 6, 6]: {tmp_path / 'one'} holds a run made with [5, 5, 5] "
        f"({tmp_path / 'one' / '.manifest' / 'settings.json'})"
    )
    assert {p: p.read_bytes() for p in (tmp_path / "one").glob("*.png")} == made
    for extra, message in [
        ((), "--class_labels: the model is class-conditional"),
        (("--class_labels", "1000"), "--class_labels: label 1000 is out of range"),
        (("--class_labels", "[1, 2]"), "--class_labels: 2 labels given for 3 references"),
        (("--class_labels", str(tmp_path / "nope.txt")), "--class_labels: cannot read"),
    ]:
        assert _sample(tmp_path, tmp_path / "tiny.pt", "bad", *flags, *extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
    assert _sample(tmp_path, tmp_path / "tiny.pt", "bad", "--model.flags", "--image_sise 16") == 2
    assert (
        "--model.flags: unknown guided-diffusion flag --image_sise; did you mean --image_size?"
        in capsys.readouterr().err
    )
    assert _sample(tmp_path, tmp_path / "tiny.pt", "bad", *flags, "--model.preset", "tiny16") == 2
    assert "--model.flags: give either it or --model.preset" in capsys.readouterr().err
    save_plain_state_dict(tmp_path / "uncond.pt", build_unet("tiny16"))
    assert (
        _sample(tmp_path, tmp_path / "uncond.pt", "bad", "--model.preset", "tiny16", "--class_labels", "3")
        == 2
    )
    assert "--class_labels: the model is not class-conditional" in capsys.readouterr().err
