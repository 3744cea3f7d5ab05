"""The decoded copies written by prepare: the size rule, draft decoding, and that a crop made
from a copy is the crop made from the original."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.core.copies import CopyWriter, PreparedImages, decode_copy
from pipeline.core.errors import PipelineError
from pipeline.core.imageio import load_rgb
from pipeline.core.preprocess import Preprocessing, resize_and_crop
from pipeline.core.resize_graph import resized_shape

PP = Preprocessing(input_size=224, resize_size=256, interpolation="bicubic",
                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def smooth_image(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like image: a coarse random colour field, enlarged bicubically, plus noise."""
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, (height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC),
                     dtype=np.int16)
    noisy = img + rng.integers(-4, 5, img.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(640, 480), (480, 900), (1000, 31), (257, 300)])
def test_copy_of_a_large_png_gives_exactly_the_crop_of_the_original(size):
    """Lossless originals: the copy is the resize the graph would make, so the network's crop
    from the copy equals the crop from the original, level for level."""
    img = smooth_image(*size, seed=sum(size))
    data = io.BytesIO()
    img.save(data, "PNG")
    copy = decode_copy(io.BytesIO(data.getvalue()), short_side=256)
    expected = resized_shape(size[1], size[0], 256) if min(size) > 256 else (size[1], size[0])
    assert copy.shape[:2] == expected
    original = np.asarray(img)
    np.testing.assert_array_equal(resize_and_crop(copy, PP), resize_and_crop(original, PP))


def test_small_images_are_stored_as_decoded_never_enlarged():
    img = smooth_image(40, 32, seed=3)
    data = io.BytesIO()
    img.save(data, "PNG")
    copy = decode_copy(io.BytesIO(data.getvalue()), short_side=256)
    np.testing.assert_array_equal(copy, np.asarray(img))


def test_large_jpeg_is_draft_decoded_within_the_stated_tolerance():
    """A 2048x1536 JPEG is decoded at 1/2 DCT scale (>= 2 x short_side), then resized; its crop
    differs from the full decode's crop by at most 3 grey levels (docs state 2 on photos)."""
    img = smooth_image(2048, 1536, seed=7)
    data = io.BytesIO()
    img.save(data, "JPEG", quality=90)
    drafted = load_rgb(io.BytesIO(data.getvalue()), draft_short_side=512)
    assert drafted.size == (1024, 768)  # draft really happened
    copy = decode_copy(io.BytesIO(data.getvalue()), short_side=256)
    full = np.asarray(load_rgb(io.BytesIO(data.getvalue())))
    diff = np.abs(resize_and_crop(copy, PP).astype(int) - resize_and_crop(full, PP).astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.5


def test_jpeg_smaller_than_twice_the_short_side_is_not_drafted():
    img = smooth_image(600, 450, seed=8)
    data = io.BytesIO()
    img.save(data, "JPEG", quality=90)
    assert load_rgb(io.BytesIO(data.getvalue()), draft_short_side=512).size == (600, 450)


def test_exif_orientation_is_applied_once_in_the_copy():
    img = smooth_image(60, 40, seed=9)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = io.BytesIO()
    img.save(data, "JPEG", quality=95, exif=exif)
    copy = decode_copy(io.BytesIO(data.getvalue()), short_side=256)
    assert copy.shape == (60, 40, 3)


def write_store(folder, arrays):
    writer = CopyWriter(folder)
    for key, arr in arrays.items():
        writer.add(key, arr)
    return writer.close()


def test_store_round_trip_and_keep(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"c/{i}.jpg": rng.integers(0, 256, (5 + i, 7, 3), dtype=np.uint8)
              for i in range(4)}
    size = write_store(tmp_path, arrays)
    assert size == sum(a.nbytes for a in arrays.values())
    images = PreparedImages(tmp_path)
    assert len(images) == 4
    for key, arr in arrays.items():
        np.testing.assert_array_equal(images.rgb(key), arr)
    with pytest.raises(PipelineError, match="no copy of c/9.jpg"):
        images.rgb("c/9.jpg")


def test_copy_changed_or_truncated_is_one_line_error_naming_it(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"a.jpg": rng.integers(0, 256, (4, 4, 3), dtype=np.uint8),
              "b.jpg": rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)}
    write_store(tmp_path, arrays)
    store = tmp_path / "pixels.bin"
    data = bytearray(store.read_bytes())
    data[3] ^= 0xFF
    store.write_bytes(bytes(data))
    images = PreparedImages(tmp_path)
    with pytest.raises(PipelineError, match=r"copy of a\.jpg is missing or changed") as err:
        images.rgb("a.jpg")
    assert "\n" not in str(err.value) and "re-run `pipeline prepare`" in str(err.value)
    np.testing.assert_array_equal(images.rgb("b.jpg"), arrays["b.jpg"])
    store.write_bytes(bytes(data[:60]))
    with pytest.raises(PipelineError, match=r"copy of b\.jpg is missing or changed"):
        PreparedImages(tmp_path).rgb("b.jpg")


def test_missing_store_says_re_run_prepare(tmp_path):
    with pytest.raises(PipelineError, match="re-run `pipeline prepare`"):
        PreparedImages(tmp_path)


def test_copies_smaller_than_the_backbone_resize_are_refused(tmp_path):
    write_store(tmp_path, {"a.jpg": np.zeros((4, 4, 3), np.uint8)})
    (tmp_path / "summary.json").write_text('{"copies": {"short_side": 128}}')
    images = PreparedImages(tmp_path)
    with pytest.raises(PipelineError, match="prepare.short_side: 256"):
        images.crop("a.jpg", PP)
    images.require(128)  # a backbone resizing to 128 is fine
