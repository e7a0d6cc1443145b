"""Guarantees that hold for every input, checked with hypothesis: the run plan (shards, batches,
per-image seeds), respacing, the uint8 <-> float conversion, the projection operators, the
command-line normalisation."""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ilvr_toolkit.cli import normalize_options
from ilvr_toolkit.conditioning import Compose, Grayscale, LowPass, Mask, resize_matrix
from ilvr_toolkit.diffusion.respace import respace_betas, space_timesteps
from ilvr_toolkit.diffusion.schedules import get_named_beta_schedule
from ilvr_toolkit.images import to_float, to_uint8
from ilvr_toolkit.sampling.plan import batches, plan_items, shard_range
from ilvr_toolkit.sampling.seeds import image_seed

names_st = st.lists(st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True), min_size=1, max_size=12, unique=True)


@given(count=st.integers(0, 10**6), num_shards=st.integers(1, 1000))
def test_shards_split_every_index_once_into_near_equal_contiguous_ranges(count, num_shards):
    ranges = [shard_range(count, k, num_shards) for k in range(num_shards)]
    assert ranges[0].start == 0 and ranges[-1].stop == count
    assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:], strict=False))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


@given(
    names=names_st,
    samples=st.integers(1, 4),
    factors=st.lists(st.sampled_from([2, 4, 8, 16, 32]), min_size=1, max_size=3, unique=True),
    run_seed=st.integers(0, 2**32 - 1),
    num_shards=st.integers(1, 5),
    batch_size=st.integers(1, 7),
)
def test_a_sharded_batched_plan_is_the_whole_plan(names, samples, factors, run_seed, num_shards, batch_size):
    """The union of the shards' items is the run's, each item with the same file name and seed;
    batches keep order, never mix factors, and every factor of an image reuses its noise."""
    factors = factors if len(factors) > 1 else [None]
    whole = plan_items(names, samples_per_reference=samples, factors=factors, run_seed=run_seed)
    shards = [
        plan_items(
            names,
            samples_per_reference=samples,
            factors=factors,
            run_seed=run_seed,
            indices=shard_range(len(names), k, num_shards),
        )
        for k in range(num_shards)
    ]
    assert sorted(i.filename for s in shards for i in s) == sorted(i.filename for i in whole)
    assert {i for s in shards for i in s} == set(whole)
    assert len({i.filename for i in whole}) == len(whole) == len(names) * samples * len(factors)
    by_image = {(i.reference, i.sample): i.seed for i in whole}
    assert all(by_image[(i.reference, i.sample)] == i.seed for i in whole)
    assert len(set(by_image.values())) == len(by_image)
    grouped = batches(whole, batch_size)
    assert [i for b in grouped for i in b] == whole
    assert all(0 < len(b) <= batch_size and len({i.factor for i in b}) == 1 for b in grouped)


@given(run_seed=st.integers(0, 2**63 - 1), image=st.integers(0, 10**7), sample=st.integers(0, 10**4))
def test_image_seeds_are_63_bit_and_depend_on_every_part(run_seed, image, sample):
    seed = image_seed(run_seed, image, sample)
    assert 0 <= seed < 2**63 and seed == image_seed(run_seed, image, sample)
    others = {image_seed(run_seed + 1, image, sample), image_seed(run_seed, image + 1, sample)}
    assert seed not in others | {image_seed(run_seed, image, sample + 1)}


@st.composite
def respacing(draw):
    num_steps = draw(st.integers(1, 4000))
    sections = draw(st.integers(1, min(num_steps, 6)))
    size, extra = divmod(num_steps, sections)
    counts = [draw(st.integers(1, size + (1 if i < extra else 0))) for i in range(sections)]
    return num_steps, counts


@given(respacing())
def test_respacing_keeps_the_asked_steps_of_each_section(spec):
    """guided-diffusion's section rule: each section keeps exactly its count, evenly from its
    first step (and its last, when it keeps two or more)."""
    num_steps, counts = spec
    kept = space_timesteps(num_steps, ",".join(map(str, counts)))
    assert kept == sorted(set(kept)) and len(kept) == sum(counts)
    size, extra = divmod(num_steps, len(counts))
    start = 0
    for i, count in enumerate(counts):
        stop = start + size + (1 if i < extra else 0)
        section = [t for t in kept if start <= t < stop]
        assert len(section) == count and section[0] == start
        assert count == 1 or section[-1] == stop - 1
        start = stop


@settings(max_examples=30)
@given(respacing(), st.sampled_from(["linear", "cosine"]))
def test_respaced_betas_keep_alpha_bar_at_the_kept_steps(spec, schedule):
    """prod_{j <= i} (1 - beta'_j) = alpha_bar_{t_i}: the respaced chain has the original marginals."""
    num_steps, counts = spec
    assume(schedule == "cosine" or num_steps >= 21)  # shorter linear schedules are refused
    alphas_cumprod = torch.cumprod(1 - get_named_beta_schedule(schedule, num_steps).double(), 0)
    kept = space_timesteps(num_steps, counts)
    betas = respace_betas(alphas_cumprod, kept)
    assert ((betas > 0) & (betas < 1)).all()
    torch.testing.assert_close(torch.cumprod(1 - betas, 0), alphas_cumprod[kept], rtol=1e-8, atol=1e-15)


@given(st.integers(2, 4000), st.integers(1, 4000))
def test_ddim_respacing_is_an_integer_stride_or_refused(num_steps, desired):
    try:
        kept = space_timesteps(num_steps, f"ddim{desired}")
    except ValueError as error:
        assert f"{desired} of {num_steps}" in str(error)
        assert all(-(-num_steps // s) != desired for s in range(1, num_steps))  # ceil(T / s) steps
        return
    stride = kept[1] - kept[0] if len(kept) > 1 else num_steps
    assert kept == list(range(0, num_steps, stride)) and len(kept) == desired


@given(st.binary(min_size=3, max_size=3 * 64))
def test_uint8_to_float_and_back_is_the_identity(data):
    pixels = torch.frombuffer(bytearray(data[: len(data) // 3 * 3]), dtype=torch.uint8).view(1, 3, 1, -1)
    x = to_float(pixels)
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(to_uint8(x), pixels)


@given(st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=1, max_size=64))
def test_float_to_uint8_rounds_to_the_nearest_level_after_clamping(values):
    x = torch.tensor(values, dtype=torch.float32)
    back = to_float(to_uint8(x), torch.float64)
    assert ((back - x.double().clamp(-1, 1)).abs() <= 1 / 255 + 1e-6).all()


@given(st.integers(1, 512), st.integers(1, 512))
def test_every_resize_row_is_a_weighted_mean(in_length, out_length):
    """Each output pixel's weights sum to one, so phi_N keeps a constant image."""
    matrix = resize_matrix(in_length, out_length)
    assert matrix.shape == (out_length, in_length)
    torch.testing.assert_close(matrix.sum(1), torch.ones(out_length, dtype=torch.float64))


@settings(max_examples=25, deadline=None)
@given(
    side=st.sampled_from([8, 12, 16, 24, 32, 48]),
    factor=st.sampled_from([1, 2, 3, 4, 8, 16]),
    constant=st.floats(-1, 1),
    seed=st.integers(0, 2**31),
)
def test_phi_n_keeps_constants_and_is_linear(side, factor, constant, seed):
    assume(side % factor == 0)
    phi = LowPass(side, factor, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.rand(2, 2, 3, side, side, generator=gen, dtype=torch.float64) * 2 - 1
    flat = torch.full((1, 3, side, side), constant, dtype=torch.float64)
    torch.testing.assert_close(phi(flat), flat, rtol=0, atol=1e-12)
    torch.testing.assert_close(phi(0.3 * x - 2 * y), 0.3 * phi(x) - 2 * phi(y), rtol=0, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    side=st.integers(1, 9),
    batch=st.integers(1, 3),
    kinds=st.lists(st.sampled_from(["mask", "grayscale"]), min_size=1, max_size=3),
    seed=st.integers(0, 2**31),
)
def test_masks_grayscale_and_their_compositions_are_orthogonal_projections(side, batch, kinds, seed):
    """P(P x) = P x and <P x, y> = <x, P y>: the projection step may apply P once per step."""
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(batch, 1, side, side, generator=gen) < 0.5).float()
    op = Compose(*[Mask(mask) if kind == "mask" else Grayscale() for kind in kinds])
    x, y = torch.randn(2, batch, 3, side, side, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(op(op(x)), op(x), rtol=0, atol=1e-12)
    assert math.isclose((op(x) * y).sum().item(), (x * op(y)).sum().item(), rel_tol=1e-9, abs_tol=1e-9)


option_st = st.from_regex(r"--[a-z][a-z0-9]*([-_.][a-z0-9]+){0,3}", fullmatch=True)


@given(name=option_st, value=st.text(max_size=20))
def test_an_option_value_passes_unchanged_in_either_spelling(name, value):
    """``--a-b=v`` and ``--a-b v`` both reach the parser as ``--a_b`` with ``v`` untouched,
    whatever v holds (spaces, '=', dashes)."""
    assume(not value.startswith("-"))
    canonical = "--" + name[2:].replace("-", "_")
    assert normalize_options([f"{name}={value}"]) == [f"{canonical}={value}"]
    assert normalize_options([name, value]) == [canonical, value]
    assert normalize_options(["prepare", value]) == ["prepare", value]


def _per_image_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in eps-network (B, 3, H, W) -> (B, 3, H, W) that treats each image alone, exactly."""
    return torch.tanh(x.roll(1, dims=-1)) * (t.float() / 1000)[:, None, None, None]


@settings(max_examples=20, deadline=None)
@given(
    seeds=st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=6, unique=True),
    cuts=st.lists(st.integers(1, 5), max_size=5),
    method=st.sampled_from(["ddpm", "ddim"]),
    task=st.sampled_from(["none", "ilvr", "sdedit"]),
)
def test_an_image_depends_on_its_seed_not_on_its_batch(seeds, cuts, method, task):
    """generate() over any split of the seeds into batches gives the same images, exactly."""
    from ilvr_toolkit.diffusion import DiffusionConfig
    from ilvr_toolkit.sampling.config import SamplerSpec
    from ilvr_toolkit.sampling.generate import Condition, generate, sampling_diffusion

    sampler = SamplerSpec(method=method, respacing="5", eta=0.5)
    diffusion = sampling_diffusion(DiffusionConfig(steps=100, learn_sigma=False), sampler)
    references = torch.randint(
        0, 256, (len(seeds), 3, 8, 8), generator=torch.Generator().manual_seed(len(seeds))
    )
    references = references.to(torch.uint8)

    def run(lo: int, hi: int) -> torch.Tensor:
        condition = None
        if task != "none":
            start = 2 if task == "sdedit" else None
            condition = Condition(references[lo:hi], LowPass(8, 2), range_t=0, start_index=start)
        return generate(_per_image_net, diffusion, seeds[lo:hi], 8, torch.device("cpu"), sampler, condition)

    whole = run(0, len(seeds))
    bounds = sorted({0, len(seeds), *(c for c in cuts if c < len(seeds))})
    split = torch.cat([run(lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False)])
    assert torch.equal(split, whole)
    assert len(seeds) == 1 or not torch.equal(whole[0], whole[1])  # other seeds, other images


def _center_crop_arr_upstream(pil_image, image_size):
    """guided-diffusion's ``center_crop_arr`` as it was (resizes the whole image): the reference."""
    import numpy as np
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    crop_y, crop_x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


@st.composite
def _crop_case(draw):
    size = draw(st.integers(1, 24))
    short = draw(st.sampled_from([1, 2, 3, size - 1, size, size + 1, 2 * size - 1, 2 * size, 2 * size + 1]))
    short = max(1, short + draw(st.integers(0, 3)) * draw(st.sampled_from([0, size])))
    long = short * draw(st.sampled_from([1, 1.3, 2, 4.5, 7, 30, 200])) + draw(st.integers(0, 9))
    w, h = (int(long), short) if draw(st.booleans()) else (short, int(long))
    return size, w, h, draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from([0, 1, 4]))


@settings(max_examples=300, deadline=None)
@given(case=_crop_case())
def test_center_crop_arr_is_bit_exact_with_guided_diffusion(case):
    """Any size and aspect ratio, any content: the windowed resample gives upstream's bytes, also
    when it is forced on every shape (``FULL_RESIZE_MAX`` 0, 1)."""
    import numpy as np
    from PIL import Image

    from ilvr_toolkit.data import references

    size, w, h, seed, full_max = case
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    if seed % 3 == 0:  # smooth content too, where rounding sits near .5 more often
        pixels = np.broadcast_to(np.linspace(0, 255, w, dtype=np.uint8)[None, :, None], (h, w, 3)).copy()
    image = Image.fromarray(pixels)
    old, references.FULL_RESIZE_MAX = references.FULL_RESIZE_MAX, full_max
    try:
        got = references.center_crop_arr(image, size)
    finally:
        references.FULL_RESIZE_MAX = old
    want = _center_crop_arr_upstream(image, size)
    assert got.shape == want.shape == (size, size, 3) and np.array_equal(got, want)
