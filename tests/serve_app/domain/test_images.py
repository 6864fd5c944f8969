"""Images in and out: input decoded upright and in sRGB, within bounds on its structure (JPEG scans, chunks and
segments, stray bytes), pixels and CPU time, refused from its structure before Pillow parses it past them;
output in every format decodes to what was encoded (PNG exactly), whatever the shape."""

import io
import itertools
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from serve_app.domain.errors import BadImageError, ImageServeError, UnsupportedImageTypeError
from serve_app.domain.images import (
    DECODE_COST_PER_MEGAPIXEL,
    MAX_JPEG_SCANS,
    DecodeLimits,
    check_structure,
    decode_image,
    encode_image,
    encode_png_rgb,
    image_size,
    input_decode_cost,
    inspect_image,
    open_image,
    prepare_input_image,
    to_pil,
    to_uint8,
)
from tests.hostile_images import (
    chunk_flood_png,
    chunk_flood_webp,
    encoded,
    jpeg_scans,
    scan_bomb_jpeg,
    segment_flood_jpeg,
    split_idat_png,
    stray_bytes_jpeg,
)


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


def test_zlib_ng_writes_a_stream_the_stdlib_zlib_reads_back_to_the_same_rows():
    """The writer's deflater swapped (issue 31): the IDAT stream must stay a plain zlib stream."""
    import zlib

    pixels = np.random.default_rng(5).integers(0, 256, (33, 17, 3), dtype=np.uint8)
    ours, stdlib = encode_png_rgb(pixels, bands=3), encode_png_rgb(pixels, bands=3, deflater=zlib)
    idat = ours[ours.index(b"IDAT") + 4:ours.index(b"IEND") - 8]
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(33, 17 * 3 + 1)
    assert (raw[:, 0] == 2).all() and np.array_equal(np.asarray(decoded(stdlib)), pixels)


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



# ---- input bounds (issue 27) -------------------------------------------------------------------------


@pytest.fixture
def pillow_must_not_parse(monkeypatch):
    """Pillow's opener, made to fail the test if anything reaches it: the refusal comes from the structure."""
    def refuse(*args, **kwargs):
        raise AssertionError("Pillow was asked to parse a file that the structure check should refuse")

    monkeypatch.setattr(Image, "open", refuse)


def refusal(check, data: bytes, **kwargs) -> BadImageError:
    with pytest.raises(BadImageError) as err:
        check(data, **kwargs)
    assert err.value.status_code == 400 and err.value.code == "invalid_image" and err.value.param == "image"
    return err.value


EVERY_ENTRY = [check_structure, open_image, inspect_image, decode_image, prepare_input_image]


@pytest.mark.parametrize("check", EVERY_ENTRY)
def test_the_scan_bomb_is_refused_from_its_structure_before_pillow_parses_it(check, pillow_must_not_parse):
    """Issue 27's JPEG, small: one AC scan of a few bytes repeated 2,000 times (20,000 in the issue: 25 s)."""
    bomb = scan_bomb_jpeg(2000)
    assert len(jpeg_scans(bomb)) == 2010 and len(bomb) < 40_000
    assert f"more than {MAX_JPEG_SCANS} scans, the limit" in refusal(check, bomb).message


def test_a_jpeg_at_the_scan_limit_decodes_to_its_pixels_and_one_scan_more_is_refused():
    at_limit = scan_bomb_jpeg(MAX_JPEG_SCANS - 10)  # libjpeg's standard progression has 10 scans of its own
    assert len(jpeg_scans(at_limit)) == check_structure(at_limit).scans == MAX_JPEG_SCANS
    plain = np.asarray(decode_image(scan_bomb_jpeg(0)))
    assert np.array_equal(np.asarray(decode_image(at_limit)), plain)  # the repeats change no pixel
    refusal(decode_image, scan_bomb_jpeg(MAX_JPEG_SCANS - 9))
    refusal(decode_image, at_limit, limits=DecodeLimits(max_scans=MAX_JPEG_SCANS - 1))  # the bound is a setting


@pytest.mark.parametrize("where", ["before", "after", "idat"])
@pytest.mark.parametrize("check", EVERY_ENTRY)
def test_a_png_chunk_flood_is_refused_from_its_structure_wherever_the_chunks_are(check, where,
                                                                                 pillow_must_not_parse):
    """Issue 27's PNG, small: 5,000 empty chunks (a million, 12 MB, in the issue: 2.5 s of Pillow's time)
    before the image data (walked when Pillow opens it), after it (when it finishes loading), or as empty
    image-data chunks."""
    flood = chunk_flood_png(5000, where)
    limit = DecodeLimits().max_chunks(len(flood))
    assert limit == 1024 + len(flood) // 4096 < 5000
    assert f"more than {limit} PNG chunks, the limit" in refusal(check, flood).message


def test_the_chunk_bound_grows_with_the_file_so_image_data_split_in_many_chunks_decodes():
    """libpng writes image data in 8 KB chunks: a large file holds many. The bound is the base plus one chunk
    per 4 KB of file; here both scaled down so that a small file shows it."""
    limits = DecodeLimits(base_chunks=64, bytes_per_chunk=128)
    data, image = split_idat_png(200, (96, 96))  # ~28 KB of noise in 200 chunks of ~140 bytes
    assert limits.max_chunks(len(data)) == 64 + len(data) // 128 > 202  # IHDR, 200 x IDAT, IEND
    assert np.array_equal(np.asarray(decode_image(data, limits=limits)), np.asarray(image))
    assert check_structure(data, limits).chunks == 202
    refusal(check_structure, data, limits=DecodeLimits(base_chunks=64, bytes_per_chunk=4096))
    few_chunks = chunk_flood_png(1000)  # under the base of 1024: a file with much metadata still opens
    assert decode_image(few_chunks).size == (64, 64)


@pytest.mark.parametrize(("build", "limit"), [
    (lambda: segment_flood_jpeg(5000), "JPEG segments"),
    (lambda: stray_bytes_jpeg(100_000), "KB of stray bytes between its JPEG segments, the limit"),
    (lambda: chunk_flood_webp(5000), "WEBP chunks"),
], ids=["jpeg-segments", "jpeg-stray-bytes", "webp-chunks"])
def test_floods_in_jpeg_segments_stray_bytes_and_webp_chunks_are_refused_before_pillow(build, limit,
                                                                                      pillow_must_not_parse):
    assert limit in refusal(decode_image, build()).message


def test_a_few_stray_bytes_and_comments_still_decode_as_libjpeg_allows():
    for data in (stray_bytes_jpeg(100), segment_flood_jpeg(100)):
        assert decode_image(data).size == (64, 64)


def test_a_decode_past_its_cpu_budget_is_refused_naming_it():
    """The backstop for what the walk does not model: Pillow reads as it decodes, and each read checks the
    thread's CPU time. A clock that advances a second a reading stands in for a slow decode."""
    ticks = itertools.count()
    data = encoded("JPEG", (256, 256), quality=90, progressive=True)
    error = refusal(decode_image, data, limits=DecodeLimits(max_decode_cpu_s=3), clock=lambda: float(next(ticks)))
    assert "takes more than 3 s of CPU to decode, the limit" in error.message
    assert decode_image(data, limits=DecodeLimits(max_decode_cpu_s=3), clock=lambda: 0.0).size == (256, 256)


def png_chunk_types(data: bytes) -> list[bytes]:
    pos, kinds = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        kinds.append(kind)
        pos += 12 + length
    return kinds


def test_a_prepared_input_is_a_plain_png_of_the_decoded_upright_srgb_pixels():
    """What the router sends a replica: the caller's image decoded (upright, sRGB) and re-encoded as a bare
    8-bit RGB PNG, with no metadata left to interpret, that decodes to exactly those pixels."""
    from PIL import ImageCms

    sideways = Image.new("RGB", (40, 20), (200, 30, 30))
    sideways.paste((30, 30, 200), (0, 0, 10, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for data in (jpeg(sideways, exif=exif.tobytes(), icc_profile=srgb), encoded("WEBP"), chunk_flood_png(10)):
        prepared = prepare_input_image(data)
        assert png_chunk_types(prepared) == [b"IHDR", b"IDAT", b"IEND"]
        back = decoded(prepared)
        assert back.mode == "RGB" and not back.info
        assert np.array_equal(np.asarray(back), np.asarray(decode_image(data)))
    assert decoded(prepare_input_image(jpeg(sideways, exif=exif.tobytes()))).size == (20, 40)


def test_an_inputs_decode_cost_counts_its_pixels_and_its_scans():
    small, large = inspect_image(encoded("PNG", (256, 256))), inspect_image(encoded("PNG", (1024, 1024)))
    assert (small.format, small.width, small.height, small.scans) == ("PNG", 256, 256, 1)
    assert large.decode_cost == pytest.approx(1.048576 * DECODE_COST_PER_MEGAPIXEL)
    assert large.decode_cost == pytest.approx(16 * small.decode_cost)
    baseline = inspect_image(encoded("JPEG", (1024, 1024)))
    progressive = inspect_image(encoded("JPEG", (1024, 1024), progressive=True))
    at_limit = inspect_image(scan_bomb_jpeg(MAX_JPEG_SCANS - 10, side=1024))
    assert (baseline.scans, progressive.scans, at_limit.scans) == (1, 10, MAX_JPEG_SCANS)
    assert baseline.decode_cost == pytest.approx(large.decode_cost)
    assert baseline.decode_cost < progressive.decode_cost < at_limit.decode_cost < 2 * baseline.decode_cost
    assert input_decode_cost([small, large, at_limit]) == pytest.approx(
        small.decode_cost + large.decode_cost + at_limit.decode_cost)


def test_what_is_not_png_jpeg_or_webp_is_415_and_an_empty_file_400():
    for data in (encoded("GIF"), encoded("BMP"), b"just text", b"RIFF\x00\x00\x00\x00WEBPjunk"):
        with pytest.raises(UnsupportedImageTypeError):
            decode_image(data)
    assert "empty" in refusal(decode_image, b"").message


SIGNATURES = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x40\x00\x00\x00WEBPVP8 "]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(prefix=st.sampled_from(SIGNATURES), body=st.binary(max_size=300), cut=st.integers(0, 2000),
       source=st.sampled_from([encoded("PNG"), encoded("JPEG", progressive=True), encoded("WEBP")]))
def test_damaged_files_are_refused_as_the_callers_bad_image_never_anything_else(prefix, body, cut, source):
    """Junk after a signature, and real files cut short or with junk spliced in: an image or an
    ImageServeError (a 4xx), never another exception (a 500)."""
    for data in (prefix + body, source[:cut], source[:cut] + body + source[cut:]):
        try:
            decode_image(data)
        except ImageServeError as err:
            assert err.status_code < 500
