"""Bad and unusual image files: each is either decoded correctly to RGB or rejected with a reason."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.imageio import ImageRejected, load_rgb

from ..conftest import make_image


def png_with_declared_size(path: Path, width: int, height: int) -> Path:
    """A small valid PNG whose IHDR claims width x height (a decompression bomb header)."""
    make_image(path, seed=1, size=(4, 4))
    data = bytearray(path.read_bytes())
    ihdr_start = 8 + 4  # signature, then chunk length
    body = b"IHDR" + struct.pack(">II", width, height) + bytes(data[ihdr_start + 12:ihdr_start + 17])
    data[ihdr_start:ihdr_start + 17] = body
    data[ihdr_start + 17:ihdr_start + 21] = struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def test_plain_rgb(tmp_path):
    img = load_rgb(make_image(tmp_path / "a.png", seed=0))
    assert img.mode == "RGB" and img.size == (40, 32)


def test_truncated_jpeg_rejected(tmp_path):
    path = make_image(tmp_path / "t.jpg", seed=0, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageRejected, match="cannot decode"):
        load_rgb(path)


def test_text_file_named_png_rejected(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageRejected, match="not an image"):
        load_rgb(path)


def test_huge_declared_size_rejected_before_decoding(tmp_path):
    path = png_with_declared_size(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(ImageRejected, match="decompression bomb"):
        load_rgb(path)


def test_max_pixels_param_applies(tmp_path):
    path = make_image(tmp_path / "a.png", seed=0)
    with pytest.raises(ImageRejected, match="max_image_pixels=100"):
        load_rgb(path, max_pixels=100)


def test_missing_file(tmp_path):
    with pytest.raises(ImageRejected, match="not found"):
        load_rgb(tmp_path / "gone.png")


def test_palette_with_transparency_composited_on_white(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 1)
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    arr = np.asarray(load_rgb(path))
    assert tuple(arr[0, 0]) == (255, 0, 0)  # opaque red stays red
    assert tuple(arr[1, 1]) == (255, 255, 255)  # transparent black becomes white, not black


def test_rgba_and_la_alpha(tmp_path):
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgba.save(tmp_path / "a.png")
    arr = np.asarray(load_rgb(tmp_path / "a.png"))
    assert tuple(arr[0, 0]) == (10, 20, 30) and tuple(arr[1, 1]) == (255, 255, 255)
    la = Image.new("LA", (2, 2), (0, 128))
    la.save(tmp_path / "la.png")
    assert tuple(np.asarray(load_rgb(tmp_path / "la.png"))[0, 0]) == (127, 127, 127)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "c.jpg"
    Image.new("RGB", (8, 8), (200, 30, 30)).convert("CMYK").save(path, quality=100)
    assert Image.open(path).mode == "CMYK"
    arr = np.asarray(load_rgb(path)).astype(int)
    assert arr.shape == (8, 8, 3)
    assert abs(arr[4, 4, 0] - 200) < 12 and arr[4, 4, 1] < 50


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64], [257 * 128, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    arr = np.asarray(load_rgb(path))
    assert arr[:, :, 0].tolist() == [[0, 64], [128, 255]]
    assert (arr[:, :, 0] == arr[:, :, 2]).all()


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    out = load_rgb(path)
    assert out.size == (20, 40)
    top = np.asarray(out)[:5].mean()
    bottom = np.asarray(out)[-5:].mean()
    assert top > 200 and bottom < 50  # left stripe is now on top


def test_one_bit_and_grey(tmp_path):
    Image.new("1", (3, 3), 1).save(tmp_path / "b.png")
    Image.new("L", (3, 3), 77).save(tmp_path / "l.png")
    assert tuple(np.asarray(load_rgb(tmp_path / "b.png"))[0, 0]) == (255, 255, 255)
    assert tuple(np.asarray(load_rgb(tmp_path / "l.png"))[0, 0]) == (77, 77, 77)


def test_float_images_are_scaled_from_unit_range_and_nan_becomes_black(tmp_path):
    """Mode F (32-bit float TIFF): values in [0, 1] are scaled to 0..255, larger values are
    taken as 0..255 already, NaN becomes 0; nothing wraps around."""
    from PIL import Image as PILImage

    unit = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    PILImage.fromarray(unit, mode="F").save(tmp_path / "unit.tif")
    arr = np.asarray(load_rgb(tmp_path / "unit.tif"))
    assert arr[:, :, 0].tolist() == [[0, 64], [128, 255]]
    assert (arr[:, :, 0] == arr[:, :, 1]).all()
    wide = np.array([[np.nan, 2.0], [100.0, 300.0]], dtype=np.float32)
    PILImage.fromarray(wide, mode="F").save(tmp_path / "wide.tif")
    arr = np.asarray(load_rgb(tmp_path / "wide.tif"))
    assert arr[:, :, 0].tolist() == [[0, 2], [100, 255]]


def test_32_bit_integer_images_beyond_16_bits_are_scaled_to_their_peak(tmp_path):
    from PIL import Image as PILImage

    values = np.array([[0, 70000], [140000, 140000]], dtype=np.int32)
    PILImage.fromarray(values, mode="I").save(tmp_path / "i32.tif")
    arr = np.asarray(load_rgb(tmp_path / "i32.tif"))
    assert arr[:, :, 0].tolist() == [[0, 128], [255, 255]]
    small = np.array([[0, 100], [200, 255]], dtype=np.int32)  # 8-bit data in a 32-bit image
    PILImage.fromarray(small, mode="I").save(tmp_path / "i8.tif")
    assert np.asarray(load_rgb(tmp_path / "i8.tif"))[:, :, 0].tolist() == [[0, 100],
                                                                           [200, 255]]


def test_large_jpegs_are_drafted_to_the_smallest_dct_scale_that_keeps_the_short_side(tmp_path):
    path = make_image(tmp_path / "a.jpg", seed=0, size=(800, 600))
    assert load_rgb(path).size == (800, 600)  # no draft asked: full size
    # short side 600 >= 2 x 150: 1/4 keeps 150 (200 x 150); 1/8 would not
    assert load_rgb(path, draft_short_side=150).size == (200, 150)
    assert load_rgb(path, draft_short_side=151).size == (400, 300)  # 1/4 would give 150 < 151
    assert load_rgb(path, draft_short_side=300).size == (400, 300)  # exactly twice: 1/2
    assert load_rgb(path, draft_short_side=301).size == (800, 600)  # less than twice: none
    png = make_image(tmp_path / "a.png", seed=0, size=(800, 600))
    assert load_rgb(png, draft_short_side=150).size == (800, 600)  # only JPEG has DCT scales


def test_a_one_pixel_image_is_an_image(tmp_path):
    assert load_rgb(make_image(tmp_path / "dot.png", seed=0, size=(1, 1))).size == (1, 1)


def test_the_bomb_message_gives_the_declared_pixel_count_and_the_default_is_pillows(tmp_path):
    from pipeline.core.imageio import DEFAULT_MAX_PIXELS

    assert DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS
    # above the default, below twice it (where Pillow's own error comes first)
    path = png_with_declared_size(tmp_path / "bomb.png", 12000, 10000)
    with pytest.raises(ImageRejected, match=r"12000x10000 = 120000000 pixels exceeds "
                                            r"max_image_pixels=89478485"):
        load_rgb(path)


def test_32_bit_integer_images_within_8_bits_keep_their_values(tmp_path):
    arr = np.array([[0, 7, 200]], dtype=np.int32)
    Image.fromarray(arr, mode="I").save(tmp_path / "i.tif")
    assert np.asarray(load_rgb(tmp_path / "i.tif"))[0, :, 0].tolist() == [0, 7, 200]
