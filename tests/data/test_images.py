import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.data.images import load_image
from cnnkit.errors import DataError


def save(tmp_path, img, name, **kw):
    path = str(tmp_path / name)
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["RGB", "L", "1", "P", "RGBA", "LA", "I", "I;16", "CMYK"])
def test_every_mode_becomes_the_models_channels(tmp_path, mode, channels):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8))
    img = rgb.convert(mode) if mode not in ("I", "I;16") else rgb.convert("L").convert(mode)
    ext = "jpg" if mode == "CMYK" else ("tiff" if mode in ("I", "LA") else "png")
    path = save(tmp_path, img, f"img.{ext}")
    x = load_image(path, channels, None)
    assert x.dtype == torch.uint8 and x.shape == (channels, 12, 10)
    assert x.float().std() > 0  # not blank


def test_transparent_pixels_become_white_not_hidden_colour(tmp_path):
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[..., 0] = 200  # red under the alpha
    arr[:2, :, 3] = 255  # top half opaque, bottom half transparent
    path = save(tmp_path, Image.fromarray(arr, "RGBA"), "a.png")
    x = load_image(path, 3, None)
    assert x[:, :2].tolist() == [[[200] * 4] * 2, [[0] * 4] * 2, [[0] * 4] * 2]
    assert (x[:, 2:] == 255).all()


def test_palette_with_transparency_is_composited(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    path = save(tmp_path, img, "p.png", transparency=0)
    assert (load_image(path, 3, None) == 255).all()


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    path = save(tmp_path, Image.fromarray(arr), "deep.png")
    assert load_image(path, 1, None).flatten().tolist() == [0, 128, 255]


@pytest.mark.parametrize("mode, name", [("I;16", "dark.png"), ("I;16B", "dark.tiff"), ("I", "dark.pgm")])
def test_a_dark_16_bit_image_stays_dark(tmp_path, mode, name):
    # a 12-bit sensor's dark image (every value at most 255) was read as 8-bit: up to 257x too bright. The depth is
    # the file's (16-bit PNG, TIFF and PGM open as these modes), not a guess from the values.
    arr = np.array([[0, 100, 200, 255]], dtype=np.uint16)
    img = Image.fromarray(arr).convert(mode) if mode != "I;16" else Image.fromarray(arr)
    path = save(tmp_path, img, name)
    assert Image.open(path).mode == mode
    assert load_image(path, 1, None).flatten().tolist() == [0, 0, 1, 1]  # x 255 / 65535
    # the same values in an 8-bit image are what they were
    path = save(tmp_path, Image.fromarray(arr.astype(np.uint8)), "light.png")
    assert load_image(path, 1, None).flatten().tolist() == [0, 100, 200, 255]


def test_a_32_bit_image_is_scaled_not_wrapped_around(tmp_path):
    # values beyond 16 bits were scaled as 16-bit and wrapped past 255 (100,000 came out as 133), negative ones too
    arr = np.array([[-5, 0, 100_000, 2**30, 2**31 - 1]], dtype=np.int32)
    path = save(tmp_path, Image.fromarray(arr, "I"), "wide.tiff")
    assert load_image(path, 1, None).flatten().tolist() == [0, 0, 0, 128, 255]


@pytest.mark.parametrize("values, expected", [
    ([0.0, 0.5, 1.0, 1.04], [0, 128, 255, 255]),  # 0..1 overshooting a little (resampled): was black, read as 0..255
    ([0.0, 128.0, 255.0, 270.0], [0, 128, 255, 255]),  # 0..255
    ([0.0, 0.1, 0.2, 0.2], [0, 26, 51, 51]),  # a dark 0..1 image stays dark
    ([0.0, 32896.0, 65535.0, 65535.0], [0, 128, 255, 255]),  # 16-bit values as floats: were clipped, all white
    ([-1.0, 0.0, 1.0, float("nan")], [0, 128, 255, 0]),  # no scale fits: its own range; NaN black
])
def test_a_float_image_is_read_on_the_scale_its_values_fit(tmp_path, values, expected):
    path = save(tmp_path, Image.fromarray(np.array([values], dtype=np.float32), "F"), "float.tif")
    assert Image.open(path).mode == "F"
    assert load_image(path, 1, None).flatten().tolist() == expected


def test_cmyk_jpeg_colours(tmp_path):
    path = save(tmp_path, Image.new("RGB", (8, 8), (255, 0, 0)).convert("CMYK"), "c.jpg", quality=95)
    r, g, b = load_image(path, 3, None).float().mean(dim=(1, 2)).tolist()
    assert r > 200 and g < 60 and b < 60


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = save(tmp_path, img, "r.jpg", exif=exif)
    assert load_image(path, 3, None).shape == (3, 20, 10)


def test_resize_then_centre_crop(tmp_path):
    path = save(tmp_path, Image.new("RGB", (40, 20), (9, 9, 9)), "wide.png")
    x = load_image(path, 3, 16)
    assert x.shape == (3, 16, 16) and (x == 9).all()


@pytest.mark.parametrize("content", [b"", b"this is not an image", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00"])
def test_undecodable_files_raise_data_error_naming_the_file(tmp_path, content):
    path = tmp_path / "broken.jpg"
    path.write_bytes(content)
    with pytest.raises(DataError, match="broken.jpg"):
        load_image(str(path), 3, None)


def test_truncated_jpeg_is_refused(tmp_path):
    path = save(tmp_path, Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)),
                "t.jpg")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.jpg"):
        load_image(path, 3, None)


def test_the_numpy_batch_is_the_torch_batch_bit_for_bit(image_folder):
    """predict prepares ONNX inputs in numpy (no torch needed); the numbers are those torch computes."""
    from cnnkit.data.images import image_paths, load_batch, load_batch_array, load_image

    files = image_paths([image_folder])[:8]
    mean, std = [0.4914, 0.4822, 0.4465], [0.247, 0.2435, 0.2616]
    x, good, errors = load_batch(files, 3, 20, mean, std)
    want = (torch.stack([load_image(f, 3, 20) for f in files]).float() - torch.tensor(mean).view(1, -1, 1, 1) * 255) \
        / (torch.tensor(std).view(1, -1, 1, 1) * 255)
    assert good == files and not errors and x.dtype == torch.float32 and torch.equal(x, want)
    array, _, _ = load_batch_array(files, 3, 20, mean, std)
    assert array.dtype == np.float32 and np.array_equal(array, want.numpy())


def test_image_paths_follow_linked_folders_as_training_does_and_stop_at_loops(tmp_path):
    # predict on a folder whose class folders are symbolic links found "no images", where train and eval read them.
    import os

    from cnnkit.data.images import image_paths

    real = tmp_path / "real" / "cat"
    real.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(real / "1.png")
    photos = tmp_path / "photos"
    photos.mkdir()
    os.symlink(real, photos / "cat")
    os.symlink(photos, photos / "cat_again")  # back up the tree
    os.symlink("..", real / "up")
    assert image_paths([str(photos)]) == [str(photos / "cat" / "1.png")]


def test_load_first_images_takes_the_next_image_after_a_broken_one(tmp_path):
    from cnnkit.data.images import load_first_images

    (tmp_path / "photos" / "cat").mkdir(parents=True)
    files = [save(tmp_path, Image.new("RGB", (20, 16), (i * 90, 0, 0)), f"photos/cat/{i}.png") for i in range(3)]
    with open(files[1], "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
    x, used, warnings = load_first_images([str(tmp_path / "photos")], 2, 3, 16, [0.5] * 3, [0.25] * 3, "--images-from",
                                          ", which were not used")
    assert x.shape == (2, 3, 16, 16) and used == [files[0], files[2]]
    assert len(warnings) == 1 and files[1] in warnings[0]
    assert warnings[0].startswith(f"left out 1 broken image(s) of {tmp_path / 'photos'}, which were not used: ")
    for p in files:
        with open(p, "wb") as f:
            f.write(b"")
    with pytest.raises(DataError, match=r"none of the 3 image\(s\) of --images-from decode .*; pass images that do"):
        load_first_images([str(tmp_path / "photos")], 2, 3, 16, [0.5] * 3, [0.25] * 3, "--images-from", "")
