"""ilvr_toolkit.models: guided-diffusion layout, numerics vs the recorded official forward, I/O."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from ilvr_toolkit.diffusion import DiffusionConfig
from ilvr_toolkit.models import (
    PRESETS,
    RELEASED_CHECKPOINTS,
    CheckpointError,
    UNetConfig,
    UNetModel,
    build_unet,
    check_state_dict,
    diffusion_settings,
    get_preset,
    load_model,
    load_state_dict_file,
    save_model_file,
    save_plain_state_dict,
    sha256_file,
)
from ilvr_toolkit.models.unet import qkv_attention, timestep_embedding

BF16_REL_ERROR_BOUND = 0.05  # measured ~0.015 (relative L2) on the tiny32 fixture


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny32_path(reference_dir: Path) -> Path:
    return reference_dir / "tiny32.pt"


@pytest.fixture(scope="module")
def tiny32_state(tiny32_path: Path) -> dict[str, torch.Tensor]:
    return torch.load(tiny32_path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tiny32_model(tiny32_state) -> UNetModel:
    model = build_unet("tiny32")
    model.load_state_dict(tiny32_state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def forward_check(ref_record) -> dict[str, torch.Tensor]:
    return ref_record["forward_check"]


def _shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _random_inputs(config: UNetConfig, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.image_size, config.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


def _perturbed(model: UNetModel, seed: int = 0, std: float = 0.05) -> UNetModel:
    """Make every weight non-trivial (the zero-initialised layers would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model.eval()


# --------------------------------------------------------------------------- layout
@pytest.mark.parametrize(
    ("preset", "manifest"), [("ffhq", "manifest_ffhq256.json"), ("tiny32", "manifest_tiny32.json")]
)
def test_preset_layout_matches_official_manifest(reference_dir, preset, manifest):
    ref = json.loads((reference_dir / manifest).read_text())
    model = build_unet(preset, device="meta")
    shapes = _shapes(model)
    assert list(shapes) == list(ref["state_dict"])  # same keys in the same order
    assert shapes == ref["state_dict"]
    assert len(shapes) == ref["num_keys"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    config = UNetConfig.from_guided_diffusion_flags(ref["config"])
    assert config == get_preset(preset)
    assert list(config.channel_mult) == ref["channel_mult_resolved"]
    assert list(config.attention_ds) == ref["attention_ds_resolved"]


def test_released_256_parameter_count():
    model = build_unet("adm256", device="meta")
    assert sum(p.numel() for p in model.parameters()) == 93_563_910


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_round_trips(name):
    config = get_preset(name)
    assert UNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    build_unet(config, device="meta")


def test_released_aliases_and_filename_map():
    for alias in ("ffhq", "afhq_dog", "metfaces", "celebahq", "cub", "flowers"):
        assert get_preset(alias) == get_preset("adm256")
    for filename, preset in RELEASED_CHECKPOINTS.items():
        assert preset in PRESETS, filename
    assert RELEASED_CHECKPOINTS["ffhq_10m.pt"] == "ffhq"
    assert RELEASED_CHECKPOINTS["flowers_baseline.pt"] == "flowers"


def test_unknown_preset_lists_known_names():
    with pytest.raises(KeyError, match="tiny32"):
        get_preset("nope")


def test_config_parsing_and_defaults():
    cfg = UNetConfig(
        image_size=64, num_channels=32, num_res_blocks=1, channel_mult="1,2,2,2", attention_resolutions="16,8"
    )
    assert cfg.channel_mult == (1, 2, 2, 2) and cfg.attention_resolutions == (16, 8)
    assert cfg.attention_ds == (4, 8)
    assert UNetConfig(image_size=128, num_channels=32, num_res_blocks=1).channel_mult == (1, 1, 2, 3, 4)
    assert UNetConfig(image_size=512, num_channels=32, num_res_blocks=1).channel_mult[0] == 0.5
    assert get_preset("adm256").out_channels == 6
    assert get_preset("adm256").replace(learn_sigma=False).out_channels == 3
    with pytest.raises(ValueError, match="channel_mult"):
        UNetConfig(image_size=48, num_channels=32, num_res_blocks=1)
    with pytest.raises(ValueError, match=r"unknown UNetConfig key bogus \(known keys: attention_backend, "):
        UNetConfig.from_dict({**get_preset("tiny").to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match=r"^unknown UNetConfig key winogard \(did you mean winograd\?\)$"):
        UNetConfig.from_dict({**get_preset("tiny").to_dict(), "winogard": True})
    with pytest.raises(ValueError, match="^learn_sigma 1: expected true or false$"):  # not truthy
        get_preset("tiny").replace(learn_sigma=1)
    flags = {"image_size": "64", "num_channels": 64, "class_cond": "True", "learn_sigma": "false"}
    cfg = UNetConfig.from_guided_diffusion_flags(flags)
    assert cfg.num_classes == 1000 and not cfg.learn_sigma and cfg.attention_resolutions == (16, 8)


# --------------------------------------------------------------------------- numerics
@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("image_size", 0, "image_size must be >= 1, got 0"),
        ("image_size", -32, "image_size must be >= 1, got -32"),
        ("num_channels", 0, "num_channels must be >= 1, got 0"),
        ("num_res_blocks", 0, "num_res_blocks must be >= 1, got 0"),
        ("channel_mult", (1, 0), r"channel_mult entries must be > 0, got \(1, 0\)"),
    ],
)
def test_config_refuses_sizes_below_one(field, value, named):
    settings = {
        "image_size": 32,
        "num_channels": 32,
        "num_res_blocks": 1,
        "channel_mult": (1, 2),
        field: value,
    }
    with pytest.raises(ValueError, match=named):
        UNetConfig(**settings)


def test_input_side_not_a_multiple_of_the_downsampling_is_named(tiny32_model):
    for side in (30, 1):  # tiny32: channel_mult 1,2,2,2 halves three times
        x = torch.zeros(1, 3, side, side)
        with pytest.raises(ValueError, match=rf"x of shape \(1, 3, {side}, {side}\): .* multiples of 8"):
            tiny32_model(x, torch.zeros(1, dtype=torch.long))


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0, 7]), 8)
    assert emb.shape == (2, 8) and emb.dtype == torch.float32
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert emb[1, 0] == pytest.approx(torch.cos(torch.tensor(7.0)).item())
    assert emb[1, 4] == pytest.approx(torch.sin(torch.tensor(7.0)).item())


def test_fresh_model_output_is_zero():
    """The last conv is zero-initialised as in guided-diffusion."""
    model = build_unet("tiny").eval()
    x, t = _random_inputs(model.config)
    with torch.no_grad():
        assert torch.count_nonzero(model(x, t)) == 0


def test_forward_matches_official_record(tiny32_model, forward_check):
    assert forward_check["t"].tolist() == [5, 500]
    with torch.no_grad():
        out = tiny32_model(forward_check["x"], forward_check["t"])
    diff = (out - forward_check["out"]).abs().max().item()
    print(f"tiny32 forward vs official record: max abs diff {diff:.3e}")
    assert out.shape == (2, 6, 32, 32)
    assert diff <= 1e-5


def test_float_timesteps_equal_integer_timesteps(tiny32_model, forward_check):
    with torch.no_grad():
        a = tiny32_model(forward_check["x"], forward_check["t"])
        b = tiny32_model(forward_check["x"], forward_check["t"].double())
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("legacy", [True, False])
def test_sdpa_equals_math_attention(legacy):
    qkv = torch.randn(3, 3 * 4 * 16, 64, generator=torch.Generator().manual_seed(1))
    a = qkv_attention(qkv, num_heads=4, legacy=legacy, backend="sdpa")
    b = qkv_attention(qkv, num_heads=4, legacy=legacy, backend="math")
    assert a.shape == (3, 64, 64)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_model_math_backend_equals_sdpa(tiny32_state, forward_check):
    model = build_unet(get_preset("tiny32").replace(attention_backend="math")).eval()
    model.load_state_dict(tiny32_state)
    with torch.no_grad():
        math_out = model(forward_check["x"], forward_check["t"])
        model.set_attention_backend("sdpa")
        sdpa_out = model(forward_check["x"], forward_check["t"])
    assert (math_out - sdpa_out).abs().max().item() <= 1e-5
    assert (math_out - forward_check["out"]).abs().max().item() <= 1e-5


def test_channels_last_input(tiny32_model, forward_check):
    x = forward_check["x"].to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = tiny32_model(x, forward_check["t"])
    assert (out - forward_check["out"]).abs().max().item() <= 1e-5


def test_bf16_autocast_close_to_fp32(tiny32_model, forward_check):
    inner_dtypes = []
    hook = (
        tiny32_model.input_blocks[1][0]
        .in_layers[2]
        .register_forward_hook(lambda _m, _i, out: inner_dtypes.append(out.dtype))
    )
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = tiny32_model(forward_check["x"], forward_check["t"])
    finally:
        hook.remove()
    ref = forward_check["out"]
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    print(f"bf16 autocast relative L2 error: {rel:.4f} (bound {BF16_REL_ERROR_BOUND})")
    assert inner_dtypes == [torch.bfloat16]  # autocast really ran the convs in bf16
    assert out.dtype == torch.float32  # the head runs in fp32 as guided-diffusion's
    assert 0 < rel < BF16_REL_ERROR_BOUND


def test_new_attention_order_is_a_permutation_of_legacy():
    """With qkv rows reordered from [q_h,k_h,v_h per head] to [q..., k..., v...] outputs agree."""
    legacy_cfg = get_preset("tiny")
    legacy = _perturbed(build_unet(legacy_cfg))
    new = build_unet(legacy_cfg.replace(use_new_attention_order=True)).eval()
    state = legacy.state_dict()
    for key, value in state.items():
        if key.endswith(("qkv.weight", "qkv.bias")):
            heads = legacy.get_submodule(key.rsplit(".", 2)[0]).num_heads
            ch = value.shape[0] // (3 * heads)
            state[key] = value.reshape(heads, 3, ch, *value.shape[1:]).transpose(0, 1).reshape(value.shape)
    new.load_state_dict(state)
    x, t = _random_inputs(legacy_cfg)
    with torch.no_grad():
        torch.testing.assert_close(new(x, t), legacy(x, t), rtol=0, atol=1e-5)


def test_class_conditional_model():
    config = get_preset("tiny16").replace(num_classes=5)
    model = _perturbed(build_unet(config))
    assert model.state_dict()["label_emb.weight"].shape == (5, config.time_embed_dim)
    x, t = _random_inputs(config)
    with torch.no_grad():
        a = model(x, t, torch.tensor([0, 1]))
        b = model(x, t, torch.tensor([3, 1]))
    assert a.shape == (2, 6, 16, 16)
    assert not torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="class"):
        model(x, t)


@pytest.mark.parametrize("preset", ["tiny16", "tiny"])
def test_gradient_checkpointing_same_gradients(preset):
    config = get_preset(preset)
    plain = _perturbed(build_unet(config)).train()
    ckpt = build_unet(config.replace(use_checkpoint=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t = _random_inputs(config)
    grads = []
    for model in (plain, ckpt):
        model.zero_grad()
        model(x, t).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g_plain, g_ckpt in zip(*grads, strict=True):
        torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- checking
def test_wrong_learn_sigma_is_named(tiny32_state):
    with pytest.raises(CheckpointError, match="learn_sigma") as info:
        check_state_dict(tiny32_state, get_preset("tiny32").replace(learn_sigma=False))
    assert len(str(info.value).splitlines()) < 8  # one readable message, not a wall of keys


def test_wrong_image_size_is_named(tiny32_state):
    config = get_preset("tiny32").replace(image_size=64, channel_mult=())
    with pytest.raises(CheckpointError, match="image_size"):
        check_state_dict(tiny32_state, config)


def test_other_settings_are_named(tiny32_state):
    tiny32 = get_preset("tiny32")
    cases = {
        "num_channels": tiny32.replace(num_channels=64),
        "num_res_blocks": tiny32.replace(num_res_blocks=2),
        "attention_resolutions": tiny32.replace(attention_resolutions=(8,)),
        "num_classes": tiny32.replace(num_classes=10),
        "resblock_updown": tiny32.replace(resblock_updown=True),
        "channel_mult": tiny32.replace(channel_mult=(1, 2, 2)),
    }
    for setting, config in cases.items():
        with pytest.raises(CheckpointError, match=setting):
            check_state_dict(tiny32_state, config)


def test_module_prefix_is_stripped(tiny32_state, tmp_path, forward_check):
    prefixed = {f"module.{k}": v for k, v in tiny32_state.items()}
    assert set(check_state_dict(prefixed, get_preset("tiny32"))) == set(tiny32_state)
    torch.save(prefixed, tmp_path / "ddp.pt")
    loaded = load_model(tmp_path / "ddp.pt", preset="tiny32")
    with torch.no_grad():
        out = loaded.model(forward_check["x"], forward_check["t"])
    assert (out - forward_check["out"]).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------- files
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_state_dict_file(tmp_path / "nothere.pt")


def test_truncated_file(tiny32_path, tmp_path):
    data = tiny32_path.read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_state_dict_file(tmp_path / "half.pt")
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_model(tmp_path / "half.pt", preset="tiny32")


def test_plain_file_needs_a_preset(tiny32_path, tmp_path):
    with pytest.raises(CheckpointError, match="preset"):
        load_model(tiny32_path)
    released_name = tmp_path / "ffhq_10m.pt"
    shutil.copyfile(tiny32_path, released_name)
    with pytest.raises(CheckpointError, match="preset='ffhq'"):
        load_model(released_name)
    with pytest.raises(CheckpointError, match="released checkpoint"):
        load_model(released_name, preset="tiny")


def test_plain_file_loads_with_preset(tiny32_path, forward_check):
    loaded = load_model(tiny32_path, preset="tiny32")
    assert loaded.source_kind == "plain"  # the diffusion comes from the preset's flags
    assert loaded.diffusion == DiffusionConfig(learn_sigma=True).to_dict()
    assert loaded.sha256 == sha256_file(tiny32_path) and len(loaded.sha256) == 64
    assert not loaded.model.training
    with torch.no_grad():
        out = loaded.model(forward_check["x"], forward_check["t"])
    assert (out - forward_check["out"]).abs().max().item() <= 1e-5


def test_model_file_round_trip(tiny32_model, tmp_path, forward_check):
    config = get_preset("tiny32")
    diffusion = {"steps": 1000, "noise_schedule": "linear"}
    path = tmp_path / "sub" / "model.pt"
    save_model_file(path, config, tiny32_model.state_dict(), diffusion=diffusion, extra={"step": 7})
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # no temp file left
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "ilvr_toolkit.model/1" and raw["extra"] == {"step": 7}
    loaded = load_model(path)
    assert loaded.source_kind == "ilvr_toolkit"
    assert loaded.unet_config == config and loaded.diffusion == diffusion
    with torch.no_grad():
        out = loaded.model(forward_check["x"], forward_check["t"])
    assert (out - forward_check["out"]).abs().max().item() <= 1e-5
    assert load_model(path, preset="tiny32").unet_config == config
    math_cfg = config.replace(attention_backend="math")
    assert load_model(path, preset=math_cfg).unet_config.attention_backend == "math"
    with pytest.raises(CheckpointError, match="different architecture than preset tiny: "):
        load_model(path, preset="tiny")
    with pytest.raises(CheckpointError, match=r"than the given flags: num_channels: file 32 vs 64"):
        load_model(path, flags="--image_size 32 --num_channels 64 --channel_mult 1,2,2,2 --learn_sigma True")


def test_save_model_file_refuses_mismatch_and_unplain_extra(tiny32_model, tmp_path):
    with pytest.raises(CheckpointError, match="learn_sigma"):
        save_model_file(tmp_path / "a.pt", get_preset("tiny32").replace(learn_sigma=False), tiny32_model)
    with pytest.raises(TypeError, match="weights_only"):
        save_model_file(tmp_path / "b.pt", get_preset("tiny32"), tiny32_model, extra={"p": tmp_path})
    assert list(tmp_path.iterdir()) == []


def test_save_model_file_refuses_diffusion_settings_its_loaders_refuse(tiny32_model, tmp_path):
    assert set(diffusion_settings({})) == {f.name for f in dataclasses.fields(DiffusionConfig)}
    for bad in ({"stepz": 5}, {"diffusion_steps": 1000}):  # a typo, a guided-diffusion flag name
        with pytest.raises(ValueError, match=r"diffusion: unknown settings \['\w+'\]; expected .*'steps'"):
            save_model_file(tmp_path / "m.pt", get_preset("tiny32"), tiny32_model, diffusion=bad)
    assert list(tmp_path.iterdir()) == []


def test_load_model_names_a_bad_map_location_not_the_file(tiny32_path):
    for device in ("bogus", "cuda:99"):
        with pytest.raises(
            ValueError, match=f"map_location '{device}': no such device on this machine"
        ) as info:
            load_model(tiny32_path, preset="tiny32", map_location=device)
        assert not isinstance(info.value, CheckpointError) and "corrupt" not in str(info.value)


def test_plain_state_dict_round_trip(tiny32_model, tiny32_state, tmp_path):
    path = tmp_path / "plain.pt"
    save_plain_state_dict(path, {f"module.{k}": v for k, v in tiny32_model.state_dict().items()})
    raw = torch.load(path, weights_only=True)
    assert list(raw) == list(tiny32_state)  # guided-diffusion's names, no prefix
    assert all(torch.equal(raw[k], tiny32_state[k]) for k in raw)


def test_lightning_checkpoint_round_trip(tiny32_state, tmp_path, forward_check):
    config = get_preset("tiny32")
    ckpt = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": {
            **{f"model.{k}": v for k, v in tiny32_state.items()},
            "ema_model.out.2.bias": torch.zeros(6),  # other prefixes are ignored
            "diffusion_buffer": torch.ones(3),
        },
        "hyper_parameters": {"unet": config.to_dict(), "diffusion": {"noise_schedule": "linear"}, "lr": 2e-5},
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    loaded = load_model(path)
    assert loaded.source_kind == "lightning"
    assert loaded.unet_config == config and loaded.diffusion == {"noise_schedule": "linear"}
    with torch.no_grad():
        out = loaded.model(forward_check["x"], forward_check["t"])
    assert (out - forward_check["out"]).abs().max().item() <= 1e-5
    del ckpt["hyper_parameters"]["unet"]
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="unet"):
        load_model(path)
