"""The device-resident input pipeline (hmnist.augment): resizing, augmentation and
normalisation against their definitions."""
import math

import pytest
import torch

from hmnist.augment import FIELDS, Augment, Draws, ModelInput, affine_grid, colour_affine

PIXEL_LOW, PIXEL_HIGH = torch.zeros(3), torch.full((3,), 255.0)


def augmented(augment: Augment, x: torch.Tensor) -> torch.Tensor:
    """`augment` applied to a float NCHW batch in 0..255, in pixels (ModelInput folds the
    normalisation into the colour map instead): what the tests compare with definitions."""
    u = augment.draw(x.shape[0])
    x = augment.geometry(x, u)
    matrix, offset = augment.colour(x, u)
    return colour_affine(x, matrix, offset, PIXEL_LOW.to(x.device), PIXEL_HIGH.to(x.device))


def jitter_reference(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                     saturation: torch.Tensor) -> torch.Tensor:
    """The colour jitter `Augment.colour` computes, step by step: the definition it is tested
    against. Factors are per image, shape (n,)."""
    b, c, s = (f.view(-1, 1, 1, 1) for f in (brightness, contrast, saturation))
    weights = torch.tensor((0.299, 0.587, 0.114), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = x * b
    mean = (x * weights).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * c + mean
    gray = (x * weights).sum(1, keepdim=True)
    x = gray + (x - gray) * s
    return x.clamp(0, 255)


def test_model_input_matches_definition():
    norm = ModelInput(8, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5), torch.device("cpu"))
    batch = torch.full((2, 16, 16, 3), 153, dtype=torch.uint8)  # 0.6 everywhere
    x = norm(batch)
    assert x.shape == (2, 3, 8, 8) and x.is_contiguous()
    expected = [(0.6 - 0.5) / 0.2, (0.6 - 0.4) / 0.25, (0.6 - 0.3) / 0.5]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expected), atol=1e-5)


def test_augment_is_seeded_random_and_bounded():
    images = torch.randint(0, 256, (8, 3, 32, 32)).float()
    first = augmented(Augment(torch.Generator().manual_seed(0)), images)
    again = augmented(Augment(torch.Generator().manual_seed(0)), images)
    other = augmented(Augment(torch.Generator().manual_seed(1)), images)
    assert first.shape == images.shape and torch.isfinite(first).all()
    assert first.min() >= 0 and first.max() <= 255
    assert torch.equal(first, again) and not torch.allclose(first, other)
    assert not torch.allclose(first, images)


def fixed_draws(n: int, **values: float) -> Draws:
    """`n` images' draws, all alike: the identity (whole image, no rotation, no flip, colour
    kept) but for the quantities `values` names (a flip: 0.0 in `flips`)."""
    identity = {"crop_area": 1.0, "log_ratio": 0.0, "angle": 0.0, "flips": 1.0, "centre": 0.0,
                "brightness": 1.0, "contrast": 1.0, "saturation": 1.0}
    assert identity.keys() == FIELDS.keys()
    draws = torch.empty(n, sum(FIELDS.values()))
    for name, value in {**identity, **values}.items():
        draws[:, Draws.columns(name)] = torch.as_tensor(value)
    return Draws(draws)


def fixed_augment(**values) -> Augment:
    """An Augment whose every draw is fixed: identity geometry and colour unless `values` say."""
    augment = Augment(torch.Generator().manual_seed(0))
    augment.draw = lambda n: fixed_draws(n, **values)
    return augment


def test_draws_are_named_views_of_one_draw():
    """Each name reads its own quantity, in its own range: a shifted layout would read the flips
    as the rotation, or the centre as the brightness."""
    draws = Augment(torch.Generator().manual_seed(0), (0.35, 1.0), 30.0, 0.1).draw(4096)
    within = lambda x, low, high: bool((x >= low).all() and (x <= high).all())  # noqa: E731
    assert within(draws.crop_area, 0.35, 1.0) and within(draws.angle, -math.pi / 6, math.pi / 6)
    assert within(draws.log_ratio, math.log(3 / 4), math.log(4 / 3)) and within(draws.flips, 0, 1)
    assert within(draws.centre, -1, 1) and draws.centre.min() < -0.9
    for factor in (draws.brightness, draws.contrast, draws.saturation):
        assert within(factor, 0.9, 1.1)
    assert draws.flips.shape == draws.centre.shape == (4096, 2) and draws.angle.shape == (4096, 1)
    assert torch.equal(draws[torch.tensor([3, 1])].angle, draws.angle[[3, 1]])  # a rank's rows
    fixed = fixed_draws(2, angle=0.5, flips=(0.0, 1.0), saturation=2.0)
    assert fixed.angle.flatten().tolist() == [0.5, 0.5] and fixed.flips.tolist() == [[0.0, 1.0]] * 2
    assert fixed.saturation.flatten().tolist() == [2.0, 2.0] and fixed.contrast.flatten().tolist() == [1.0, 1.0]


def test_augment_geometry_matches_its_definition():
    images = torch.rand(2, 3, 16, 16) * 255
    assert torch.allclose(augmented(fixed_augment(), images), images, atol=1e-3)
    assert torch.allclose(augmented(fixed_augment(flips=(0.0, 1.0)), images), images.flip(3), atol=1e-3)
    assert torch.allclose(augmented(fixed_augment(flips=(1.0, 0.0)), images), images.flip(2), atol=1e-3)
    quarter = augmented(fixed_augment(angle=math.pi / 2), images)
    assert torch.allclose(quarter, images.rot90(1, dims=(2, 3)), atol=1e-3) or \
        torch.allclose(quarter, images.rot90(-1, dims=(2, 3)), atol=1e-3)
    for ratio in (math.log(3 / 4), math.log(4 / 3)):  # area 1: the whole image, whatever the drawn ratio
        assert torch.allclose(augmented(fixed_augment(log_ratio=ratio), images), images, atol=1e-3)
    wide = fixed_augment(crop_area=0.5, log_ratio=math.log(4))  # too wide to fit: full width, half the height
    band = torch.nn.functional.interpolate(images[:, :, 4:12, :], size=16, mode="bilinear", align_corners=False)
    assert (augmented(wide, images) - band)[:, :, 2:-2, 2:-2].abs().max() < 1e-3
    crop = augmented(fixed_augment(crop_area=0.25), images)  # the centre half of each side, stretched to the whole
    centre = torch.nn.functional.interpolate(images[:, :, 4:12, 4:12], size=16, mode="bilinear", align_corners=False)
    assert (crop - centre)[:, :, 2:-2, 2:-2].abs().max() < 1e-3


def test_crop_keeps_the_cache_detail():
    """A 35%-area crop for a 128px model, from a 224px cache of fine stripes: sampled from the
    cache it keeps the stripes; resized to 128 first and then enlarged, they were mostly gone."""
    size, cache = 128, 224
    stripes = (torch.arange(cache) % 4 < 2).float() * 200 + 20  # period 4 px: fine detail
    batch = stripes.view(1, 1, cache, 1).expand(2, cache, cache, 3).to(torch.uint8).contiguous()
    model_input = ModelInput(size, (0.0,) * 3, (1 / 255,) * 3, torch.device("cpu"))  # normalising is a no-op
    augment = fixed_augment(crop_area=0.35, contrast=1.0)
    augment.crop_area = (0.35, 1.0)
    crop = model_input(batch, augment)
    assert crop.shape == (2, 3, size, size)
    old_way = augment.geometry(model_input.resize(batch), augment.draw(2))  # the defect: resize, then crop
    contrast = lambda x: x[:, 0, size // 2, 16:-16].std().item()  # noqa: E731  across the stripes
    assert contrast(crop) > 0.75 * stripes.std().item()
    assert contrast(crop) > 2.5 * contrast(old_way)
    # a cache far larger than the model's input is reduced (antialiased) before the crop
    small = ModelInput(32, (0.0,) * 3, (1 / 255,) * 3, torch.device("cpu"))(batch, augment)
    assert small.shape == (2, 3, 32, 32) and torch.isfinite(small).all()
    assert small.min() >= 0 and small.max() <= 255


@pytest.mark.parametrize("cache", [32, 56])
def test_flips_only_take_the_direct_path_and_equal_the_resampling(cache):
    """With no crop, rotation or jitter the affine resampling is an exact copy of each flipped
    image: ModelInput flips directly, and gets what the resampling gets, draw for draw."""
    images = torch.randint(0, 256, (16, cache, cache, 3), dtype=torch.uint8)
    model_input = ModelInput(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5), torch.device("cpu"))
    fast = Augment(torch.Generator().manual_seed(3), (1.0, 1.0), 0.0, 0.0)
    slow = Augment(torch.Generator().manual_seed(3), (1.0, 1.0), 0.0, 0.0)
    assert fast.flips_only and not Augment(torch.Generator(), (0.9, 1.0), 0.0, 0.0).flips_only
    slow.flips_only = False  # force the general path
    draws = fast.draw(16)
    flipped = (draws.flips < 0.5).any(dim=1)
    assert 0 < flipped.sum() < 16
    got, expected = model_input(images, fast, draws), model_input(images, slow, draws)
    assert got.shape == (16, 3, 32, 32)
    assert torch.allclose(got, expected, atol=1e-3)
    plain = model_input(images)
    assert not torch.allclose(got[flipped], plain[flipped]) and torch.equal(got[~flipped], plain[~flipped])


def test_affine_grid_equals_torch():
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.affine_grid(theta, [5, 3, 12, 20], align_corners=False)
    assert torch.allclose(affine_grid(theta, 12, 20), expected, atol=1e-6)


def test_colour_affine_is_a_per_pixel_matrix_product_in_any_layout():
    g = torch.Generator().manual_seed(1)
    x, matrix, offset = torch.rand(4, 3, 6, 7, generator=g), torch.randn(4, 3, 3, generator=g), torch.randn(4, 3, generator=g)
    low, high = torch.tensor([-1.0, -0.5, 0.0]), torch.tensor([1.0, 0.5, 2.0])
    expected = (torch.einsum("nij,njhw->nihw", matrix, x) + offset[:, :, None, None])
    expected = torch.maximum(torch.minimum(expected, high.view(1, 3, 1, 1)), low.view(1, 3, 1, 1))
    for layout in (torch.contiguous_format, torch.channels_last):
        out = colour_affine(x, matrix, offset, low, high, layout)
        assert out.is_contiguous(memory_format=layout) and torch.allclose(out, expected, atol=1e-6)


def test_fused_colour_jitter_equals_step_by_step_definition():
    g = torch.Generator().manual_seed(3)
    images = torch.rand(6, 3, 20, 20, generator=g, dtype=torch.float64) * 255
    augment = Augment(torch.Generator().manual_seed(4))
    u = augment.draw(len(images))
    warped = augment.geometry(images.float(), u)
    matrix, offset = augment.colour(warped, u)
    fused = colour_affine(warped, matrix, offset, PIXEL_LOW, PIXEL_HIGH)
    b, c, s = u.brightness[:, 0], u.contrast[:, 0], u.saturation[:, 0]
    assert not torch.allclose(b, torch.ones(6))  # the factors really vary
    reference = jitter_reference(warped.double(), b.double(), c.double(), s.double())
    assert ((fused.double() - reference).norm() / reference.norm()) < 1e-6
    assert torch.equal(fused, augmented(Augment(torch.Generator().manual_seed(4)), images.float()))  # same draws, same path


def test_model_input_folds_normalising_into_the_colour_map():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    norm = ModelInput(20, mean, std, torch.device("cpu"))
    batch = torch.randint(0, 256, (4, 20, 20, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    folded = norm(batch, Augment(torch.Generator().manual_seed(5)))
    pixels = augmented(Augment(torch.Generator().manual_seed(5)), batch.permute(0, 3, 1, 2).float())
    expected = (pixels / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(folded, expected, atol=1e-4)
