import numpy as np
import pytest
from PIL import Image

from pipeline.core.preprocess import (
    Preprocessing,
    normalize,
    preprocess,
    resize_and_crop,
)

PP = Preprocessing(input_size=32, resize_size=36, interpolation="bicubic",
                   mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def test_shapes_and_dtypes():
    img = Image.new("RGB", (80, 50), (10, 20, 30))
    pixels = resize_and_crop(img, PP)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    x = preprocess(img, PP)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32


def test_normalize_values():
    pixels = np.full((2, 2, 3), 255, dtype=np.uint8)
    x = normalize(pixels, PP)
    assert np.allclose(x[:, 0, 0], [(1 - 0.5) / 0.2, (1 - 0.4) / 0.25, (1 - 0.3) / 0.3])
    batch = normalize(np.stack([pixels, pixels]), PP)
    assert batch.shape == (2, 3, 2, 2)


def test_round_trip_dict():
    assert Preprocessing.from_dict(PP.to_dict()) == PP


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (224, 224)])
def test_matches_timm_reference_transform(size):
    """Our single definition equals timm's eval transform for the default backbone's config."""
    import timm.data

    cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3,
           "std": (0.5,) * 3, "crop_pct": 0.875, "crop_mode": "center"}
    reference = timm.data.create_transform(**cfg, is_training=False)
    pp = Preprocessing.from_crop_pct(224, 0.875, "bicubic", (0.5,) * 3, (0.5,) * 3)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    ours = preprocess(img, pp)
    theirs = reference(img).numpy()
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < 1e-5
