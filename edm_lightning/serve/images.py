"""PNG request bodies decoded as what they are, at a cost bounded by the model's input size.

A PNG's header can declare 28x28 while its image data inflates to gigabytes (decoders inflate all of it to
check it), and its ancillary chunks can hold more compressed data. So the body's chunks are walked first
(lengths and CRCs), the image data is inflated at most one byte past what its header needs (zlib's
``max_length``), every chunk the pixels do not need is dropped, and only then does Pillow decode the image
(torchvision's decoders are deprecated). Pixels are scaled by their own bit depth (``value / (2**depth - 1)``:
1, 2, 4, 8 or 16-bit grey; a palette's colours and RGB are 8-bit), and what has no single meaning as the
model's input is refused: transparency (an alpha channel or ``tRNS``), 16-bit colour (Pillow keeps 8 of its
bits), and colour for a grey model unless every pixel is grey.
"""

from __future__ import annotations

import io
import math
import zlib

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["MAX_PNG_CHUNKS", "UnsupportedImage", "check_png_size", "decode_png_body", "png_data_size"]

SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_CHUNKS = 256  # a small image needs a handful; walking more is work the request did not pay for
#: Bit depths allowed for each colour type (PNG specification, IHDR), and its samples per pixel.
_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))  # x0, y0, dx, dy
#: Pillow's modes of an opaque PNG (palettes and 1-bit grey converted) and their full scale: it gives 1, 2 and
#: 4-bit grey scaled to 8 bits, and 16-bit grey as ``I;16`` (``I`` in older versions).
_FULL_SCALE = {"L": 255, "RGB": 255, "I;16": 65535, "I;16B": 65535, "I": 65535}
_PIXEL_CHUNKS = (b"IHDR", b"PLTE", b"IDAT", b"IEND")  # all a decoder needs; the rest (text, profiles, ...) is dropped


class UnsupportedImage(ValueError):
    """A readable PNG that is not an input of this model (transparency, 16-bit colour, colour for a grey model)."""


def check_png_size(body: bytes, height: int, width: int) -> None:
    """Refuse a PNG whose header declares another size than ``height x width``, before it is decoded.

    Raises:
        ValueError: not a PNG, or another size.
    """
    if len(body) < 24 or body[:8] != SIGNATURE or body[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    have = (int.from_bytes(body[20:24], "big"), int.from_bytes(body[16:20], "big"))  # (height, width)
    if have != (height, width):
        raise ValueError(f"the image is {have[1]}x{have[0]} pixels; the model takes {width}x{height}")


def png_data_size(width: int, height: int, depth: int, color_type: int, interlaced: bool) -> int:
    """Bytes the image data of a PNG with this header inflates to: each row's filter byte and packed samples.

    >>> png_data_size(28, 28, 8, 0, False), png_data_size(28, 28, 16, 0, False), png_data_size(28, 28, 1, 0, False)
    (812, 1596, 140)

    Returns:
        The size in bytes (the seven Adam7 passes added up when ``interlaced``).
    """
    bits = depth * _SAMPLES[color_type]
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    size = 0
    for x0, y0, dx, dy in passes:
        columns, rows = math.ceil(max(width - x0, 0) / dx), math.ceil(max(height - y0, 0) / dy)
        if columns and rows:  # an empty pass has no rows, so no filter bytes
            size += rows * (1 + math.ceil(columns * bits / 8))
    return size


def decode_png_body(body: bytes, shape: tuple[int, int, int]) -> Tensor:
    """One PNG file as the model's input, its work bounded by ``shape`` whatever the file declares or holds.

    Args:
        body: the PNG file's bytes.
        shape: the model's ``(channels, height, width)``; 1 or 3 channels.

    Returns:
        ``(1, channels, height, width)`` float32 in [0, 1], each pixel divided by its bit depth's full scale.
        A grey image given to a colour model is repeated over the 3 channels.

    Raises:
        ValueError: not a PNG, another size, a bad header, chunk or CRC, image data that inflates past what the
            header needs or ends early, or an image Pillow cannot decode.
        UnsupportedImage: transparency, 16-bit colour, or colour for a grey model.
    """
    channels, height, width = shape
    check_png_size(body, height, width)
    chunks = _walk_chunks(body)  # (type, start, end) of each chunk in ``body``
    header = body[chunks[0][1] + 8:chunks[0][2] - 4]
    depth, color_type, compression, filtering, interlace = header[8:13]
    if color_type not in _DEPTHS or depth not in _DEPTHS[color_type] or compression or filtering or interlace > 1:
        raise ValueError(f"invalid PNG header: bit depth {depth}, colour type {color_type}, compression {compression}, "
                         f"filter {filtering}, interlace {interlace}")
    kinds = {kind for kind, _, _ in chunks}
    if color_type in (4, 6) or b"tRNS" in kinds:
        raise UnsupportedImage("the PNG has transparency (an alpha channel or a tRNS chunk), which has no meaning as "
                               "the model's input: send an opaque grey or colour image")
    if color_type == 2 and depth == 16:
        raise UnsupportedImage("the PNG is 16-bit colour, which the decoder would cut to 8 bits: send 8-bit colour "
                               "or 16-bit grey")
    if color_type == 3 and b"PLTE" not in kinds:
        raise ValueError("the PNG has a palette colour type but no PLTE chunk")
    _check_image_data(b"".join(body[start + 8:end - 4] for kind, start, end in chunks if kind == b"IDAT"),
                      png_data_size(width, height, depth, color_type, bool(interlace)), width, height)
    kept = SIGNATURE + b"".join(body[start:end] for kind, start, end in chunks if kind in _PIXEL_CHUNKS)
    try:
        with Image.open(io.BytesIO(kept), formats=["PNG"]) as opened:
            image = opened.convert("RGB") if opened.mode == "P" else opened.convert("L") if opened.mode == "1" else opened
            array, mode = np.asarray(image), image.mode  # (H, W) grey or (H, W, 3) RGB
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # Pillow's words for a bad file
        raise ValueError(f"the PNG cannot be decoded: {err}") from None
    full_scale = _FULL_SCALE.get(mode)
    if full_scale is None or (full_scale == 65535) != (depth == 16):  # never scale by a guess
        raise UnsupportedImage(f"the PNG ({depth}-bit, colour type {color_type}) decodes as Pillow's mode {mode!r}, "
                               "which the API does not take: send an 8 or 16-bit grey or 8-bit colour PNG")
    pixels = torch.from_numpy(array.astype(np.float32) / np.float32(full_scale))
    pixels = pixels.permute(2, 0, 1) if pixels.ndim == 3 else pixels.unsqueeze(0)
    if pixels.shape[0] == 3 and channels == 1:
        if not (torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[0], pixels[2])):
            raise UnsupportedImage("the PNG is a colour image and the model takes grey images: send a greyscale PNG")
        pixels = pixels[:1]  # a colour image whose every pixel is grey is that grey image
    elif pixels.shape[0] == 1 and channels == 3:
        pixels = pixels.expand(3, -1, -1)
    return pixels.unsqueeze(0).contiguous()


def _walk_chunks(body: bytes) -> list[tuple[bytes, int, int]]:
    """The chunks of a PNG file up to ``IEND``, by their lengths, each checked by its CRC (at most :data:`MAX_PNG_CHUNKS`).

    Returns:
        ``(type, start, end)`` of each, IHDR first; a chunk's data is ``body[start + 8:end - 4]``.

    Raises:
        ValueError: too many chunks, one running past the end of the file or failing its CRC, no IEND, or no single
            IHDR first.
    """
    chunks, start = [], len(SIGNATURE)
    while True:
        if len(chunks) == MAX_PNG_CHUNKS:
            raise ValueError(f"the PNG has more than {MAX_PNG_CHUNKS} chunks before IEND; an image this small needs a few")
        if start + 12 > len(body):
            raise ValueError("the PNG is truncated: it ends before its IEND chunk")
        length, kind = int.from_bytes(body[start:start + 4], "big"), body[start + 4:start + 8]
        end = start + 12 + length
        if end > len(body):
            raise ValueError(f"the PNG is truncated: its {kind.decode('latin-1')!r} chunk declares {length} bytes past "
                             "the end of the file")
        if zlib.crc32(body[start + 4:end - 4]) != int.from_bytes(body[end - 4:end], "big"):
            raise ValueError(f"the PNG's {kind.decode('latin-1')!r} chunk fails its CRC: the file is damaged")
        chunks.append((kind, start, end))
        start = end
        if kind == b"IEND":
            break
    kinds = [kind for kind, _, _ in chunks]
    if kinds[0] != b"IHDR" or chunks[0][2] - chunks[0][1] != 12 + 13 or kinds.count(b"IHDR") != 1:
        raise ValueError("invalid PNG: it must start with exactly one 13-byte IHDR chunk")
    return chunks


def _check_image_data(data: bytes, size: int, width: int, height: int) -> None:
    """Refuse image data that does not inflate to exactly ``size`` bytes, inflating at most ``size + 1``.

    Raises:
        ValueError: no data, not zlib, more or fewer than ``size`` bytes, or bytes after the compressed stream.
    """
    if not data:
        raise ValueError("the PNG has no image data (IDAT)")
    inflater = zlib.decompressobj()
    try:
        inflated = inflater.decompress(data, size + 1)  # stops there: the rest is never inflated
    except zlib.error as err:
        raise ValueError(f"the PNG's image data is not valid zlib data ({err})") from None
    if len(inflated) > size:
        raise ValueError(f"the PNG's image data inflates past the {size} bytes its {width}x{height} header needs; refused "
                         "without inflating the rest")
    if len(inflated) < size or not inflater.eof:
        raise ValueError(f"the PNG's image data is truncated: {len(inflated)} of the {size} bytes its header needs")
    if inflater.unused_data:
        raise ValueError(f"the PNG's image data has {len(inflater.unused_data)} bytes after the end of its compressed stream")
