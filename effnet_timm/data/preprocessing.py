"""TF-exact EfficientNet evaluation preprocessing in plain PyTorch (no TensorFlow at run time).

Reproduces ``preprocessing.preprocess_image(is_training=False)`` of the official tensorflow/tpu
EfficientNet code, followed by its normalization:

1. Decode to RGB uint8 the way ``tf.io.decode_jpeg(channels=3)`` does. TF decodes with
   libjpeg-turbo's *fast integer DCT*; ``simplejpeg`` (a dependency) is asked for the same and
   matches TF bit for bit. Pillow (``decoder='pillow'``) decodes with the accurate DCT: about 1.2 levels
   apart on average, up to ~16 on single pixels, and that survives the resize. Grayscale is
   replicated to three channels, CMYK is converted with TF's integer formula, alpha is dropped,
   16-bit samples keep their high byte, EXIF orientation is ignored: all as in TF.

   One known residual: the official code decodes with ``decode_and_crop_jpeg``, and
   libjpeg-turbo's cropped decode treats the crop's left/right edges as image edges when it
   upsamples subsampled chroma (4:2:0, 4:2:2). The crop's first column (when the crop starts on
   an iMCU boundary, a multiple of 16 px) and its last column (when the crop ends an even number
   of pixels past the iMCU boundary at or below its start) then differ from a full decode by a
   few levels (up to 12 seen). Reproducing them needs the raw chroma planes, which simplejpeg does
   not expose; on the fixture photos this costs ~0.001 level mean after the resize.
2. Centre crop of side ``int32(float32(size / (size + crop_padding)) * min(h, w))`` at offsets
   ``((h - c) + 1) // 2``, ``((w - c) + 1) // 2``. Conventions for ``crop_padding``:

   * ``'padding32'`` (default): ``CROP_PADDING = 32`` at every size. This is the code behind the
     published accuracy table (tensorflow/tpu before commit 22d5cab, 2021-11), which timm's
     ``crop_pct`` values for ``tf_efficientnet_*`` approximate to 3 decimals.
   * ``'fraction'``: the current official code, ``CROP_FRACTION = 0.875`` at every size, turned
     into ``crop_padding = round(size * (1 / 0.875 - 1))``: 14 at 96, 32 at 224, 43 at 300.
   * ``'crop_pct'``: the padding timm's own eval transform implies for a data config's
     ``crop_pct``: ``floor(size / crop_pct) - size`` (timm resizes to ``floor(size / crop_pct)``
     and centre-crops ``size``).

   32 pixels of padding is ``crop_pct = size / (size + 32)``. effnet_timm's configs store that cut
   to 3 decimals, which timm's floor maps back to 32; timm's own ``tf_efficientnet_b3`` rounds it
   up to 0.904, which timm turns into 31. :func:`create_tf_transform` warns when the config's
   ``crop_pct`` and the chosen convention disagree. Either way the crop side is computed TF's way
   from the padding, never from ``crop_pct`` directly.
3. Legacy TF1 bicubic resize (``tf.compat.v1.image.resize_bicubic``, ``align_corners=False``,
   ``half_pixel_centers=False``): Keys cubic with a = -0.75, source coordinate ``dst * in / out``,
   4 taps clamped at the edges, weights looked up in TF's 1024-step table, no antialiasing, and
   float32 output that is neither clipped nor rounded. Done as two matrix multiplies on
   channel-first (``..., H, W``) float tensors.
4. ``(x - mean * 255) / (std * 255)`` with mean/std from a timm data config: ImageNet mean/std,
   or mean = std = 0.5, which is AdvProp's ``x * 2 / 255 - 1``.

Entry points: :func:`create_tf_transform` (a per-image callable, like ``timm.data.create_transform``)
and :func:`preprocess_batch` (NCHW float32 batch), both driven by
``timm.data.resolve_data_config({}, model=model)``. Hand them encoded bytes or paths for the exact
decode, e.g. ``timm.data.ImageDataset(root, load_bytes=True, transform=create_tf_transform(cfg))``;
a PIL image has already been decoded by Pillow.

Hostile input: an image that declares more than ``EFFNET_TIMM_MAX_IMAGE_PIXELS`` (default 100 MP) is refused
from its header with :class:`ImageTooLargeError` (a ``ValueError``) before any pixel is decoded, as is a JPEG
of more than ``MAX_JPEG_SCANS`` scans; a file larger than such an image could be is refused before it is read.
The crop is converted to float band by band, so one image at the limit takes a few hundred MB, not several GB.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import simplejpeg
import torch
from PIL import Image

from ..env import env_int

__all__ = [
    'ImageInput',
    'PUBLISHED_CROP_PADDING',
    'OFFICIAL_CROP_FRACTION',
    'ENV_MAX_IMAGE_PIXELS',
    'DEFAULT_MAX_IMAGE_PIXELS',
    'ImageTooLargeError',
    'MAX_JPEG_SCANS',
    'max_image_pixels',
    'max_image_bytes',
    'check_image_pixels',
    'open_image',
    'read_image_file',
    'decode_image',
    'tf_crop_padding',
    'tf_center_crop_window',
    'bicubic_resize_weights',
    'bicubic_resize_taps',
    'bilinear_resize_weights',
    'resize_bilinear_tf1',
    'INTERPOLATIONS',
    'resize_bicubic_tf1',
    'normalize_0_255',
    'TfEvalTransform',
    'create_tf_transform',
    'preprocess_batch',
]

ImageInput = bytes | bytearray | memoryview | str | os.PathLike | Image.Image | np.ndarray | torch.Tensor

PUBLISHED_CROP_PADDING = 32
OFFICIAL_CROP_FRACTION = 0.875

_JPEG_MAGIC = b'\xff\xd8\xff'
_DECODERS = ('auto', 'simplejpeg', 'pillow')
# TF's bicubic kernel looks its coefficients up in a table of this many steps per pixel; the
# exact kernel would be up to ~0.15 level off when upsampling.
_TF_TABLE_SIZE = 1024
_TF_CUBIC_A = -0.75


# ----------------------------------------------------------------------------- size limits

ENV_MAX_IMAGE_PIXELS = 'EFFNET_TIMM_MAX_IMAGE_PIXELS'
# 100 MP: tens of times an ImageNet photo, above what most cameras write, and about 450 MB to take through the
# TF pipeline (a 100 MP JPEG at 600 px). A file that declares more (a decompression bomb: a few hundred bytes
# saying 60000 x 60000) is refused from its header.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
# An encoded image is never larger than its uncompressed pixels (16-bit RGBA: 8 bytes each) plus headers.
_BYTES_PER_PIXEL_BOUND = 8
_HEADER_ALLOWANCE = 1 << 20
# A progressive JPEG is decoded scan by scan over the whole image, and a scan can be a few bytes: thousands of them
# take minutes within the pixel limit (about 2.5 ms a scan at 9 MP). Encoders write about 10 (mozjpeg up to ~20).
MAX_JPEG_SCANS = 100
_JPEG_SOS = b'\xff\xda'  # never inside entropy-coded data, where a 0xff byte is always followed by 0x00


class ImageTooLargeError(ValueError):
    """An image declares more pixels (or its file holds more bytes, or a JPEG more scans) than the limits allow:
    refused before decoding."""


def max_image_pixels() -> int:
    """The most pixels (width x height) an image may declare: ``EFFNET_TIMM_MAX_IMAGE_PIXELS`` or 100 MP."""
    return env_int(ENV_MAX_IMAGE_PIXELS, DEFAULT_MAX_IMAGE_PIXELS, 1, 'a whole number of pixels')


def max_image_bytes(max_pixels: int | None = None) -> int:
    """The largest image file read: what ``max_pixels`` 16-bit RGBA pixels take uncompressed, plus 1 MiB."""
    return _BYTES_PER_PIXEL_BOUND * (max_image_pixels() if max_pixels is None else max_pixels) + _HEADER_ALLOWANCE


def check_image_pixels(width: int, height: int, max_pixels: int | None = None) -> None:
    """Raise :class:`ImageTooLargeError` when ``width x height`` is over the pixel limit."""
    limit = max_image_pixels() if max_pixels is None else max_pixels
    if width * height > limit:
        raise ImageTooLargeError(
            f'{width}x{height} pixels ({width * height / 1e6:,.1f} MP) is over the limit of {limit:,} '
            f'({ENV_MAX_IMAGE_PIXELS}); refused before decoding'
        )


def read_image_file(path: str | os.PathLike, max_pixels: int | None = None) -> bytes:
    """The bytes of an image file, refused (:class:`ImageTooLargeError`) without reading when the file is larger
    than any image within the pixel limit can be (:func:`max_image_bytes`)."""
    limit = max_image_bytes(max_pixels)
    with open(path, 'rb') as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise ImageTooLargeError(
                f'{size:,} bytes is more than an image within the pixel limit can hold ({limit:,} bytes; '
                f'{ENV_MAX_IMAGE_PIXELS}); refused before reading'
            )
        data = f.read(limit + 1)  # a file that grows meanwhile (or lies in st_size, as /proc does) stays bounded
    if len(data) > limit:
        raise ImageTooLargeError(f'more than {limit:,} bytes ({ENV_MAX_IMAGE_PIXELS}); refused')
    return data


_PILLOW_BOMB = re.compile(r'\((\d+) pixels\)')


def open_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Pillow's lazy open of encoded ``data``, refused (:class:`ImageTooLargeError`) before any pixel is decoded
    when it declares more pixels than the limit. Pillow's own decompression-bomb warning is left to this check."""
    limit = max_image_pixels() if max_pixels is None else max_pixels
    if data.startswith(_JPEG_MAGIC):
        _check_jpeg_scans(data)  # every Pillow path (timm's transform too) comes through here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # Pillow refuses above twice Image.MAX_IMAGE_PIXELS by itself
        match = _PILLOW_BOMB.search(str(err))
        pixels = f'{int(match.group(1)):,} pixels ({int(match.group(1)) / 1e6:,.1f} MP)' if match else 'its size'
        pillow_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        where = (
            f'the limit of {limit:,} ({ENV_MAX_IMAGE_PIXELS})'
            if match and int(match.group(1)) > limit
            else f"Pillow's decompression-bomb limit of {pillow_limit:,} (2 x PIL.Image.MAX_IMAGE_PIXELS)"
        )
        raise ImageTooLargeError(f'{pixels} is over {where}; refused before decoding') from None
    try:
        check_image_pixels(img.width, img.height, limit)
    except ImageTooLargeError:
        img.close()
        raise
    return img


# ----------------------------------------------------------------------------- decoding


def decode_image(image: ImageInput, decoder: str = 'auto', max_pixels: int | None = None) -> torch.Tensor:
    """Decode ``image`` to an RGB uint8 tensor of shape (H, W, 3), the way TF's decoders do.

    ``image`` may be encoded bytes, a file path, a PIL image, or a uint8 array/tensor in HWC or
    CHW layout (2-D means grayscale; a 4th channel is taken as alpha and dropped).
    ``decoder`` picks the JPEG decoder: ``'simplejpeg'`` (bit-exact with TF), ``'pillow'``
    (accurate DCT, ~1 level off), or ``'auto'`` (simplejpeg). Other formats
    always go through Pillow, which is lossless for them.

    An encoded image (or a lazily opened PIL image) that declares more than ``max_pixels``
    (default :func:`max_image_pixels`) is refused from its header with :class:`ImageTooLargeError`,
    before anything of its size is allocated; a path's message names the file.
    """
    if decoder not in _DECODERS:
        raise ValueError(f'decoder must be one of {_DECODERS}, got {decoder!r}')
    if max_pixels is None:
        max_pixels = max_image_pixels()
    if isinstance(image, (str, os.PathLike)):
        try:
            return decode_image(read_image_file(image, max_pixels), decoder, max_pixels)
        except ImageTooLargeError as err:
            raise ImageTooLargeError(f'{os.fspath(image)}: {err}') from None
    if isinstance(image, (bytes, bytearray, memoryview)):
        rgb = _decode_bytes(bytes(image), decoder, max_pixels)
    elif isinstance(image, Image.Image):
        check_image_pixels(image.width, image.height, max_pixels)
        rgb = _pil_to_rgb(image)
    elif isinstance(image, np.ndarray):
        return _array_to_rgb(torch.from_numpy(np.array(image)))  # copied: it may be read-only
    elif isinstance(image, torch.Tensor):
        return _array_to_rgb(image)
    else:
        raise TypeError(f'unsupported image type {type(image).__name__}')
    return torch.from_numpy(np.ascontiguousarray(rgb))


def _check_jpeg_scans(data: bytes) -> None:
    scans = data.count(_JPEG_SOS)
    if scans > MAX_JPEG_SCANS:
        raise ImageTooLargeError(
            f'{scans:,} scans (JPEG start-of-scan markers), more than the {MAX_JPEG_SCANS} any encoder writes: '
            'each is decoded over the whole image; refused before decoding'
        )


def _decode_bytes(data: bytes, decoder: str, max_pixels: int) -> np.ndarray:
    if data.startswith(_JPEG_MAGIC) and decoder != 'pillow':
        _check_jpeg_scans(data)
        return _decode_jpeg_simplejpeg(data, max_pixels)
    with open_image(data, max_pixels) as img:
        return _pil_to_rgb(img)


def _decode_jpeg_simplejpeg(data: bytes, max_pixels: int) -> np.ndarray:
    # TF's decode_jpeg defaults: dct_method '' = INTEGER_FAST, fancy_upscaling=True. simplejpeg's
    # default strict=True raises on truncated data, as TF does.
    options = dict(fastdct=True, fastupsample=False)
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    check_image_pixels(width, height, max_pixels)  # the header only: nothing of the declared size allocated yet
    if colorspace in ('CMYK', 'YCCK'):
        cmyk = simplejpeg.decode_jpeg(data, colorspace='CMYK', **options)
        return _cmyk_to_rgb_tf(cmyk, stored_inverted=_has_adobe_marker(data, max_pixels))
    return simplejpeg.decode_jpeg(data, colorspace='RGB', **options)


def _has_adobe_marker(data: bytes, max_pixels: int) -> bool:
    # Opening is lazy: Pillow parses the markers without decoding the scan.
    with open_image(data, max_pixels) as img:
        return 'adobe' in img.info


def _cmyk_to_rgb_tf(cmyk: np.ndarray, stored_inverted: bool) -> np.ndarray:
    """TF's CMYK -> RGB (jpeg_mem.cc): integer products of the samples as stored in the file.

    Adobe-marked files store inverted CMYK, so there ``r = c * k // 255``; otherwise
    ``r = (255 - c) * (255 - k) // 255``.
    """
    values = cmyk if stored_inverted else 255 - cmyk
    # uint16 holds 255 * 255: the same integers as in TF's int arithmetic, at a quarter of int32's memory.
    return (values[..., :3].astype(np.uint16) * values[..., 3:] // 255).astype(np.uint8)


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode == 'CMYK':
        # Pillow always un-inverts CMYK on load ("assume adobe conventions"), so undo that to get
        # the stored samples back before applying TF's formula.
        stored = 255 - np.asarray(img)
        return _cmyk_to_rgb_tf(stored, stored_inverted='adobe' in img.info)
    if img.mode.startswith('I;16'):
        # TF (libpng strip_16) keeps the high byte; Pillow's convert('RGB') would clip instead.
        gray = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    # Gray is replicated, palettes expanded, alpha dropped without compositing: as TF does.
    return np.array(img.convert('RGB'))


def _array_to_rgb(t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.uint8:
        raise TypeError(f'image arrays must be uint8 (0..255 pixels), got {t.dtype}')
    if t.ndim == 2:
        t = t[..., None]
    if t.ndim != 3:
        raise ValueError(f'expected an HW, HWC or CHW image, got shape {tuple(t.shape)}')
    if t.shape[-1] not in (1, 3, 4):
        if t.shape[0] not in (1, 3, 4):
            raise ValueError(f'cannot tell the channel axis of shape {tuple(t.shape)}')
        t = t.permute(1, 2, 0)
    if t.shape[-1] == 1:
        t = t.expand(-1, -1, 3)
    return t[..., :3].contiguous()


# ----------------------------------------------------------------------------- crop


def tf_crop_padding(image_size: int, crop: str | int = 'padding32', crop_pct: float | None = None) -> int:
    """The ``crop_padding`` of the official code for ``image_size`` under a crop convention.

    ``crop`` is ``'padding32'`` (published-table code: 32), ``'fraction'`` (current code:
    crop fraction 0.875), ``'crop_pct'`` (the padding timm's eval transform implies for
    ``crop_pct``: ``floor(image_size / crop_pct) - image_size``) or an explicit padding in pixels.
    """
    if isinstance(crop, bool):
        raise TypeError('crop must be a convention name or an int padding, not a bool')
    if isinstance(crop, int):
        if crop < 0:
            raise ValueError(f'crop padding must be >= 0, got {crop}')
        return crop
    if crop == 'padding32':
        return PUBLISHED_CROP_PADDING
    if crop == 'fraction':
        # Verbatim from the official _decode_and_center_crop (Python round on a float64).
        return round(image_size * (1 / OFFICIAL_CROP_FRACTION - 1))
    if crop == 'crop_pct':
        if crop_pct is None:
            raise ValueError("crop='crop_pct' needs a crop_pct")
        return _padding_from_crop_pct(image_size, crop_pct)
    raise ValueError(f"crop must be 'padding32', 'fraction', 'crop_pct' or an int, got {crop!r}")


def _padding_from_crop_pct(image_size: int, crop_pct: float) -> int:
    # timm's transforms_imagenet_eval: scale_size = floor(img_size / crop_pct).
    return math.floor(image_size / crop_pct) - image_size


def crop_pct_for(image_size: int, crop_padding: int = PUBLISHED_CROP_PADDING, decimals: int = 3) -> float:
    """The crop_pct for which timm's eval transform resizes to ``image_size + crop_padding``, as the official
    crop does: the largest one with ``decimals`` decimals (more where that many cannot say it: from about
    1000 px at 3) for which ``floor(image_size / crop_pct)`` is exactly that size. The one crop_pct rule of
    effnet_timm (the pretrained cfgs, and timm's transform aligned to the official crop for comparison)."""
    target = image_size + crop_padding
    for places in range(decimals, 10):
        scale = 10**places
        k = image_size * scale // target  # image_size / target cut to `places` decimals, in exact integers
        while k > 0 and _padding_from_crop_pct(image_size, k / scale) < crop_padding:  # float division may fall short
            k -= 1
        if k > 0 and _padding_from_crop_pct(image_size, k / scale) == crop_padding:
            return k / scale
    raise ValueError(f'no crop_pct makes timm resize {image_size} px to {target} px')


def tf_center_crop_window(height: int, width: int, image_size: int, crop_padding: int) -> tuple[int, int, int, int]:
    """The official ``crop_window`` ``(offset_h, offset_w, side, side)`` for an image of h x w."""
    # The Python float64 ratio becomes a float32 constant in the graph; the product is float32
    # and tf.cast to int32 truncates.
    ratio = np.float32(image_size / (image_size + crop_padding))
    side = int(ratio * np.float32(min(height, width)))
    if side < 1:
        raise ValueError(f'image {height}x{width} is too small for a centre crop at size {image_size}')
    return (height - side + 1) // 2, (width - side + 1) // 2, side, side


# ----------------------------------------------------------------------------- resize


@functools.lru_cache(maxsize=64)
def bicubic_resize_taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TF1 legacy ``resize_bicubic`` along one axis as 4 taps per output: ``(indices, weights)``, both
    (out_size, 4), int64 source indices clamped to the edges and float32 weights from TF's table.

    Cached per size pair; treat the result as read-only.
    """
    table = _tf_cubic_table()
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    base = np.floor(src)
    # lrintf rounds half to even, as np.rint does.
    offset = np.rint((src - base) * np.float32(_TF_TABLE_SIZE)).astype(np.int64)
    mirrored = _TF_TABLE_SIZE - offset
    taps = np.stack([table[offset, 1], table[offset, 0], table[mirrored, 0], table[mirrored, 1]], axis=1)
    columns = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3), 0, in_size - 1)
    return torch.from_numpy(columns), torch.from_numpy(np.ascontiguousarray(taps, dtype=np.float32))


@functools.lru_cache(maxsize=64)
def bicubic_resize_weights(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, in_size) float32 matrix of TF1 legacy ``resize_bicubic`` along one axis.

    Cached per size pair; treat the result as read-only.
    """
    columns, taps = (t.numpy() for t in bicubic_resize_taps(in_size, out_size))
    weights = np.zeros((out_size, in_size), dtype=np.float32)
    # Clamped taps hit the same column; TF adds their contributions, so add the weights.
    np.add.at(weights, (np.repeat(np.arange(out_size), 4), columns.ravel()), taps.ravel())
    return torch.from_numpy(weights)


# Output rows (columns) per band of the banded resize: each band multiplies only the input rows its taps touch.
_RESIZE_BAND = 32


@functools.lru_cache(maxsize=64)
def _resize_bands(in_size: int, out_size: int) -> tuple[tuple[int, int, int, int, torch.Tensor], ...]:
    """``(out_start, out_stop, in_start, in_stop, weights)`` blocks of :func:`bicubic_resize_weights`: outside
    ``in_start:in_stop`` a block's weights are exactly zero, so leaving them out drops only zero products. The
    remaining sums run in another order than the dense product's (matmul blocks by the band's width), so the
    result equals the dense one up to float32 rounding (a few ulp), not bit for bit."""
    weights = bicubic_resize_weights(in_size, out_size)
    index, _ = bicubic_resize_taps(in_size, out_size)
    bands = []
    for o0 in range(0, out_size, _RESIZE_BAND):
        o1 = min(out_size, o0 + _RESIZE_BAND)
        lo, hi = int(index[o0:o1].min()), int(index[o0:o1].max()) + 1
        bands.append((o0, o1, lo, hi, weights[o0:o1, lo:hi].contiguous()))
    return tuple(bands)


def _resize_bicubic_tf1_hwc(image: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`resize_bicubic_tf1` of one HWC image, returned CHW: its nonzero products, summed in another order
    (see :func:`_resize_bands`; tested against TF), done as banded matrix products on contiguous rows.
    A DataLoader worker's crop of a photo is 300-600 px; the
    dense product there spends most of its time multiplying zero weights."""
    height, width, channels = image.shape
    rows = torch.empty(size, width * channels, dtype=torch.float32)
    for o0, o1, lo, hi, w in _resize_bands(height, size):
        # Each band's rows become float32 on their own: the same operands as converting the whole crop first,
        # without a float copy of it (4 bytes a sample: 1.4 GB for a 100 MP photo's crop).
        torch.matmul(w, image[lo:hi].reshape(hi - lo, width * channels).float(), out=rows[o0:o1])
    # (size, channels, width): columns become the contiguous axis for the second product.
    cols_in = rows.view(size, width, channels).permute(0, 2, 1).reshape(size * channels, width)
    out = torch.empty(size * channels, size, dtype=torch.float32)
    for o0, o1, lo, hi, w in _resize_bands(width, size):
        out[:, o0:o1] = torch.matmul(cols_in[:, lo:hi], w.t())
    return out.view(size, channels, size).permute(1, 0, 2).contiguous()


@functools.lru_cache(maxsize=1)
def _tf_cubic_table() -> np.ndarray:
    # TF's InitCoeffsTable: column 0 is the kernel at distance x, column 1 at x + 1, for
    # x = i / 1024; evaluated in double (a is a double) and stored as float.
    a = _TF_CUBIC_A
    x = np.arange(_TF_TABLE_SIZE + 1, dtype=np.float64) / _TF_TABLE_SIZE
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * (x + 1) - 5 * a) * (x + 1) + 8 * a) * (x + 1) - 4 * a
    return np.stack([near, far], axis=1).astype(np.float32)


@functools.lru_cache(maxsize=64)
def bilinear_resize_weights(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, in_size) float32 matrix of TF1 legacy ``resize_bilinear`` along one axis.

    TF's ``compute_interpolation_weights`` with the legacy scaler (``align_corners=False``,
    ``half_pixel_centers=False``): source ``in = o * (in_size / out_size)`` in float32, taps
    ``floor(in)`` and ``min(ceil(in), in_size - 1)``, weight ``in - floor(in)`` on the upper one.
    Cached per size pair; treat the result as read-only.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lower = np.floor(src)
    lerp = (src - lower).astype(np.float32)
    lo = np.maximum(lower.astype(np.int64), 0)
    hi = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
    weights = np.zeros((out_size, in_size), dtype=np.float32)
    np.add.at(weights, (np.arange(out_size), lo), np.float32(1) - lerp)
    np.add.at(weights, (np.arange(out_size), hi), lerp)
    return torch.from_numpy(weights)


def resize_bilinear_tf1(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """``tf.compat.v1.image.resize(..., BILINEAR)`` (legacy ``resize_bilinear``, no half-pixel centres) on
    (..., H, W): the resize of the official ``main.py`` for EfficientNet-Lite and -EdgeTPU
    (``preprocessing.py`` imports ``tensorflow.compat.v1``). float32, unclipped, like TF's."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    x = images if images.is_floating_point() else images.float()
    in_h, in_w = x.shape[-2:]
    wy = bilinear_resize_weights(in_h, out_h).to(device=x.device, dtype=x.dtype)
    wx = bilinear_resize_weights(in_w, out_w).to(device=x.device, dtype=x.dtype)
    return torch.matmul(torch.matmul(wy, x), wx.t())


# The official eval resizes: TF1 bicubic (default), TF1 bilinear (Lite/EdgeTPU in main.py).
INTERPOLATIONS = ('bicubic', 'bilinear')


def resize_bicubic_tf1(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """``tf.compat.v1.image.resize_bicubic`` (legacy, no half-pixel centres) on (..., H, W).

    Channel-first layout (NCHW or CHW); integer inputs are converted to float32. The output is
    float32, unclipped and unrounded, like TF's.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    x = images if images.is_floating_point() else images.float()
    in_h, in_w = x.shape[-2:]
    wy = bicubic_resize_weights(in_h, out_h).to(device=x.device, dtype=x.dtype)
    wx = bicubic_resize_weights(in_w, out_w).to(device=x.device, dtype=x.dtype)
    # Rows first, then columns: the order TF's kernel interpolates in.
    return torch.matmul(torch.matmul(wy, x), wx.t())


# ----------------------------------------------------------------------------- normalize


def normalize_0_255(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean * 255) / (std * 255)`` per channel on 0..255 channel-first images.

    The official code subtracts and divides by float32 constants ``MEAN_RGB``/``STDDEV_RGB``
    already scaled to 0..255; this keeps that order.
    """
    shape = (-1, 1, 1)
    m = torch.tensor(np.float32(np.asarray(mean, dtype=np.float64) * 255), device=images.device).view(shape)
    s = torch.tensor(np.float32(np.asarray(std, dtype=np.float64) * 255), device=images.device).view(shape)
    return (images - m) / s


# ----------------------------------------------------------------------------- timm glue


class TfEvalTransform:
    """Official TF EfficientNet eval preprocessing of one image: decode, crop, resize, normalize.

    Calling it returns a (3, size, size) float32 tensor. ``crop_padding`` and ``crop_pct`` (its
    equivalent, ``size / (size + crop_padding)``) say which crop is applied.
    """

    def __init__(
        self,
        image_size: int,
        crop_padding: int,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        decoder: str = 'auto',
        max_pixels: int | None = None,
        interpolation: str = 'bicubic',
    ) -> None:
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f'interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}')
        if (mean is None) != (std is None):
            raise ValueError('give both mean and std, or neither to skip normalization')
        if decoder not in _DECODERS:
            raise ValueError(f'decoder must be one of {_DECODERS}, got {decoder!r}')
        self.image_size = image_size
        self.crop_padding = crop_padding
        self.mean = None if mean is None else tuple(mean)
        self.std = None if std is None else tuple(std)
        self.decoder = decoder
        self.interpolation = interpolation
        # Read once here (a bad EFFNET_TIMM_MAX_IMAGE_PIXELS fails at once, not per image) and carried to workers.
        self.max_pixels = max_image_pixels() if max_pixels is None else max_pixels

    @property
    def crop_pct(self) -> float:
        return self.image_size / (self.image_size + self.crop_padding)

    def crop_window(self, height: int, width: int) -> tuple[int, int, int, int]:
        return tf_center_crop_window(height, width, self.image_size, self.crop_padding)

    def __call__(self, image: ImageInput) -> torch.Tensor:
        rgb = decode_image(image, self.decoder, self.max_pixels)
        top, left, side, _ = self.crop_window(rgb.shape[0], rgb.shape[1])
        crop = rgb[top : top + side, left : left + side]
        if self.interpolation == 'bilinear':
            x = resize_bilinear_tf1(crop.permute(2, 0, 1), self.image_size)
        else:
            x = _resize_bicubic_tf1_hwc(crop, self.image_size)
        return x if self.mean is None else normalize_0_255(x, self.mean, self.std)

    def __repr__(self) -> str:
        return (
            f'{type(self).__name__}(image_size={self.image_size}, crop_padding={self.crop_padding} '
            f'(crop_pct={self.crop_pct:.4f}), interpolation={self.interpolation!r}, mean={self.mean}, std={self.std}, '
            f'decoder={self.decoder!r})'
        )


def create_tf_transform(
    data_config: Mapping[str, Any],
    crop: str | int = 'padding32',
    decoder: str = 'auto',
    normalize: bool = True,
    interpolation: str | None = None,
) -> TfEvalTransform:
    """The official TF eval preprocessing for a timm data config.

    The resize is ``interpolation`` when given, else the config's when it is one of the official ones
    (TF1 ``'bicubic'``, or ``'bilinear'``: Lite's and EdgeTPU's pretrained cfgs), else TF1 bicubic.

    ``data_config`` is what ``timm.data.resolve_data_config({}, model=model)`` returns; its
    ``input_size`` (square) and ``mean``/``std`` are used. ``crop`` is the crop convention (see
    :func:`tf_crop_padding`; ``'crop_pct'`` reads ``data_config['crop_pct']``). A warning is
    issued when the config's ``crop_pct``, ``crop_mode`` or ``interpolation`` describe a
    different preprocessing than the one returned. ``normalize=False`` keeps 0..255 pixels.
    """
    size = _square_size(data_config['input_size'])
    padding = tf_crop_padding(size, crop, data_config.get('crop_pct'))
    _warn_on_config_mismatch(data_config, size, padding, crop, interpolation)
    mean, std = (data_config['mean'], data_config['std']) if normalize else (None, None)
    if interpolation is None:
        configured = data_config.get('interpolation', 'bicubic')
        interpolation = configured if configured in INTERPOLATIONS else 'bicubic'
    return TfEvalTransform(size, padding, mean, std, decoder, interpolation=interpolation)


def preprocess_batch(
    images: Sequence[ImageInput],
    data_config: Mapping[str, Any],
    crop: str | int = 'padding32',
    decoder: str = 'auto',
    normalize: bool = True,
    interpolation: str | None = None,
) -> torch.Tensor:
    """Preprocess ``images`` with :func:`create_tf_transform` and stack them: (N, 3, S, S) float32."""
    transform = create_tf_transform(data_config, crop, decoder, normalize, interpolation)
    return torch.stack([transform(image) for image in images])


def _square_size(input_size: Sequence[int]) -> int:
    height, width = input_size[-2:]
    if height != width:
        raise ValueError(f'the official preprocessing makes square images; input_size is {tuple(input_size)}')
    return int(height)


def _warn_on_config_mismatch(
    data_config: Mapping[str, Any], size: int, padding: int, crop: str | int, interpolation: str | None = None
) -> None:
    crop_pct = data_config.get('crop_pct')
    if crop_pct is not None and _padding_from_crop_pct(size, crop_pct) != padding:
        warnings.warn(
            f'crop={crop!r} crops with crop_padding={padding} (crop_pct {size / (size + padding):.4f}) '
            f"but the data config's crop_pct={crop_pct} means crop_padding="
            f"{_padding_from_crop_pct(size, crop_pct)} in timm; pass crop='crop_pct' to follow the config.",
            stacklevel=3,
        )
    if data_config.get('crop_mode', 'center') != 'center':
        warnings.warn(f'crop_mode={data_config["crop_mode"]!r} ignored: TF crops the centre', stacklevel=3)
    if interpolation is None and data_config.get('interpolation', 'bicubic') not in INTERPOLATIONS:
        warnings.warn(
            f'interpolation={data_config["interpolation"]!r} ignored: TF resizes with TF1 bicubic', stacklevel=3
        )
