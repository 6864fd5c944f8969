"""Images in and out: input decoded upright and in sRGB; output in every format decodes to what was encoded
(PNG exactly), whatever the shape."""

import io

import numpy as np
import pytest
from PIL import Image

from serve_app.domain.images import decode_image, encode_image, encode_png_rgb, image_size, to_pil, to_uint8


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize(("height", "width", "bands"), [(64, 64, 4), (1, 7, 4), (3, 5, 8), (257, 129, 2),
                                                        (16, 16, 1)])
def test_the_png_encoder_is_lossless_for_any_shape_and_band_count(height, width, bands):
    pixels = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    data = encode_png_rgb(pixels, bands=bands)
    Image.open(io.BytesIO(data)).verify()  # chunk CRCs and structure
    back = decoded(data)
    assert back.mode == "RGB" and back.size == (width, height)
    assert np.array_equal(np.asarray(back), pixels)


def test_the_png_encoder_compresses_a_photo_like_image_about_as_well_as_pillow():
    from serve_app.engines.gpu_doubles import photo_like_image

    pixels = to_uint8(photo_like_image(256, 256))
    ours = encode_png_rgb(pixels)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    assert len(ours) <= 1.05 * len(buffer.getvalue())


def test_float_arrays_round_to_bytes_and_every_format_decodes():
    image = np.zeros((32, 48, 3), dtype=np.float32)
    image[..., 0] = 1.0
    image[..., 1] = 0.5
    assert image_size(image) == (48, 32) and image_size(to_pil(image)) == (48, 32)
    assert to_uint8(image)[0, 0].tolist() == [255, 128, 0]
    for fmt, pil_format in (("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")):
        back = decoded(encode_image(image, fmt))
        assert back.format == pil_format and back.size == (48, 32)
        assert np.abs(np.asarray(back.convert("RGB")).astype(int) - [255, 128, 0]).max() <= 3


def test_output_compression_is_the_jpeg_quality():
    pixels = np.random.default_rng(0).random((128, 128, 3)).astype(np.float32)
    assert len(encode_image(pixels, "jpeg", 10)) < len(encode_image(pixels, "jpeg", 95))


def jpeg(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **save)
    return buffer.getvalue()


def test_a_phone_photo_stored_sideways_is_decoded_upright():
    landscape = Image.new("RGB", (40, 20), (200, 30, 30))
    landscape.paste((30, 30, 200), (0, 0, 10, 20))  # a blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    upright = decode_image(jpeg(landscape, exif=exif.tobytes()))
    assert upright.size == (20, 40)
    assert np.asarray(upright)[2, 10, 2] > 150  # the blue band is now at the top


def test_icc_profiles_are_converted_to_srgb_and_a_broken_one_is_ignored():
    from PIL import ImageCms

    image = Image.new("RGB", (16, 16), (120, 60, 200))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    tagged = np.asarray(decode_image(jpeg(image, icc_profile=srgb))).astype(int)
    plain = np.asarray(decode_image(jpeg(image))).astype(int)
    assert np.abs(tagged - plain).max() <= 2  # sRGB to sRGB changes nothing
    broken = decode_image(jpeg(image, icc_profile=b"not an ICC profile"))
    assert broken.mode == "RGB" and np.abs(np.asarray(broken).astype(int) - plain).max() <= 2
