"""Hostile input images for the tests, built small: the structures of issue 27's attacks (a progressive JPEG
whose one AC scan repeats thousands of times, a PNG of a flood of empty chunks, and their kin in JPEG
segments, stray bytes and WEBP chunks), at sizes the service's bounds refuse, so that no test has to decode
one to see it refused.

The JPEG walk here is the tests' own, written from the format (ITU T.81 B.1), not the one under test.
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def encoded(fmt: str, size: tuple[int, int] = (64, 64), color=(120, 130, 140), **save) -> bytes:
    """A flat image in ``fmt`` (PNG, JPEG, WEBP), with Pillow's ``save`` options."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def jpeg_scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan of a JPEG: its SOS segment and the entropy-coded data after it, up to the next
    marker that is not a stuffed 0xFF00 or a restart marker."""
    scans, pos = [], 2
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI
            break
        end = pos + 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker == 0xDA:  # SOS: skip the entropy-coded data
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
            scans.append((pos, end))
        pos = end
    return scans


def scan_bomb_jpeg(extra_scans: int, side: int = 256) -> bytes:
    """The issue's bomb, small: a flat progressive JPEG (libjpeg's standard 10 scans) with its first AC scan
    (a few bytes: end-of-band runs) repeated ``extra_scans`` more times before EOI. libjpeg decodes each
    repeat as a pass over every 8x8 block of the luma plane, whatever its size in bytes; the pixels are those
    of the plain file."""
    plain = encoded("JPEG", (side, side), quality=90, progressive=True)
    start, end = min(jpeg_scans(plain)[1:], key=lambda scan: scan[1] - scan[0])  # an AC scan, not the DC one
    eoi = plain.rindex(b"\xff\xd9")
    return plain[:eoi] + plain[start:end] * extra_scans + plain[eoi:]


def png_chunk(kind: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def chunk_flood_png(chunks: int, where: str = "before", kind: bytes = b"teXt") -> bytes:
    """The issue's chunk flood, small: a 64x64 PNG with ``chunks`` empty chunks of ``kind`` (an ancillary
    type by default, which every decoder skips) ``before`` its image data (Pillow walks them when it opens
    the file), ``after`` it (when it finishes loading), or as empty image-data chunks (``idat``)."""
    plain = encoded("PNG")
    header_end = 8 + 25  # signature, IHDR
    iend = plain.rindex(b"IEND") - 4
    if where == "before":
        return plain[:header_end] + png_chunk(kind) * chunks + plain[header_end:]
    if where == "after":
        return plain[:iend] + png_chunk(kind) * chunks + plain[iend:]
    if where == "idat":
        return plain[:iend] + png_chunk(b"IDAT") * chunks + plain[iend:]
    raise ValueError(where)


def split_idat_png(pieces: int, size: tuple[int, int] = (64, 64)) -> tuple[bytes, Image.Image]:
    """A PNG whose image data is split into ``pieces`` chunks (as libpng splits it into 8 KB ones), and the
    image it holds."""
    image = Image.effect_noise(size, 64).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    pos, idat, head, tail = 8, b"", None, None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            head = data[:pos] if head is None else head
            idat += data[pos + 8:pos + 8 + length]
        elif head is not None and tail is None:
            tail = data[pos:]
        pos += 12 + length
    step = -(-len(idat) // pieces)
    parts = [idat[i:i + step] for i in range(0, len(idat), step)]
    parts += [b""] * (pieces - len(parts))
    return head + b"".join(png_chunk(b"IDAT", part) for part in parts) + tail, image


def segment_flood_jpeg(segments: int) -> bytes:
    """A 64x64 JPEG with ``segments`` empty comment (COM) segments after SOI: Pillow's header parser steps
    through each in Python."""
    plain = encoded("JPEG")
    return plain[:2] + b"\xff\xfe\x00\x02" * segments + plain[2:]


def stray_bytes_jpeg(count: int) -> bytes:
    """A 64x64 JPEG with ``count`` 0xFF fill bytes before its first segment after SOI (libjpeg skips them;
    Pillow's header parser steps over them one at a time)."""
    plain = encoded("JPEG")
    return plain[:2] + b"\xff" * count + plain[2:]


def chunk_flood_webp(chunks: int) -> bytes:
    """A 64x64 WEBP with ``chunks`` empty unknown chunks after its image (libwebp's demuxer lists each)."""
    plain = encoded("WEBP")
    body = plain[12:] + b"ABCD\x00\x00\x00\x00" * chunks
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body
