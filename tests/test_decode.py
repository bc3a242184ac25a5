"""Every PIL mode decodes to RGB in [0, 1] by its own range, never clipped (juap.data.decode).

Each image is written to a file in a data folder and read back through ``ImageFolderDataset`` at its own
size (so the resize is the identity), then compared with the values the file holds, scaled by hand.
"""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from juap.data import ImageFolderDataset
from juap.data.decode import decode_rgb
from juap.errors import DataError

S = 16  # image side; also data.image_size, so the eval transform changes nothing
RNG = np.random.default_rng(0)
GRAY16 = (RNG.beta(2, 3, (S, S)) * 65535).astype(np.uint16)  # mean about 0.4, as in the case
RGB16 = (RNG.beta(2, 3, (S, S, 3)) * 65535).astype(np.uint16)
RGB8 = RNG.integers(0, 256, (S, S, 3), dtype=np.uint8)


def _png(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB): colour type 0 gray, 2 RGB, 6 RGBA."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _pgm16(arr: np.ndarray, maxval: int = 65535) -> bytes:
    h, w = arr.shape
    return f"P5\n{w} {h}\n{maxval}\n".encode() + arr.astype(">u2").tobytes()


def _gray3(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32)).expand(3, -1, -1)


def _rgb(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32)).permute(2, 0, 1)


def _cases():
    """name -> (file name, how to write it, expected (3, S, S) tensor, tolerance)."""
    int32 = RNG.integers(-(2**31), 2**31 - 1, (S, S), dtype=np.int64).astype(np.int32)
    floats = RNG.random((S, S), dtype=np.float32)
    rgba = np.dstack([RGB8, RNG.integers(0, 256, (S, S, 1), dtype=np.uint8)])
    palette = Image.fromarray(RGB8).quantize(16)
    cmyk = Image.fromarray(RGB8).convert("CMYK")
    bits = RNG.random((S, S)) > 0.5
    red, g16, g12 = RGB8[..., 0], GRAY16 / 65535, GRAY16 >> 4
    big_endian, rgba16 = Image.fromarray(GRAY16.astype(">u2")), np.dstack([RGB16, GRAY16])
    signed = (int32.astype(np.float64) + 2**31) / (2**32 - 1)

    def save(img, **kw):
        return lambda p: img.save(p, **kw)

    def raw(data):
        return lambda p: p.write_bytes(data)

    return {
        "L (8-bit gray)": ("l.png", save(Image.fromarray(red)), _gray3(red / 255), 0),
        "I;16 (16-bit gray PNG)": ("g16.png", raw(_png(GRAY16, 0)), _gray3(g16), 1e-7),
        "I;16B (big-endian TIFF)": ("g16b.tif", save(big_endian), _gray3(g16), 1e-7),
        "I (16-bit PGM)": ("g16.pgm", raw(_pgm16(GRAY16)), _gray3(g16), 1e-7),
        "I (12-bit PGM, PIL rescales it)": ("g12.pgm", raw(_pgm16(g12, 4095)), _gray3(g12 / 4095), 2e-5),
        "I (signed 32-bit TIFF)": ("i32.tif", save(Image.fromarray(int32)), _gray3(signed), 1e-6),
        "F (float TIFF in [0, 1])": ("f.tif", save(Image.fromarray(floats)), _gray3(floats), 0),
        "1 (bilevel)": ("b.png", save(Image.fromarray(bits)), _gray3(bits.astype(np.float32)), 0),
        "P (palette)": ("p.png", save(palette), _rgb(np.asarray(palette.convert("RGB")) / 255), 0),
        "LA (gray + alpha)": ("la.png", save(Image.fromarray(rgba[..., [0, 3]], "LA")), _gray3(red / 255), 0),
        "RGB": ("rgb.png", save(Image.fromarray(RGB8)), _rgb(RGB8 / 255), 0),
        "RGBA": ("rgba.png", save(Image.fromarray(rgba)), _rgb(RGB8 / 255), 0),
        "CMYK (TIFF)": ("cmyk.tif", save(cmyk), _rgb(np.asarray(cmyk.convert("RGB")) / 255), 0),
        "16-bit RGB PNG (PIL keeps 8 bits)": ("rgb16.png", raw(_png(RGB16, 2)), _rgb(RGB16 / 65535), 1 / 255),
        "16-bit RGBA PNG": ("rgba16.png", raw(_png(rgba16, 6)), _rgb(RGB16 / 65535), 1 / 255),
    }


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    cases = _cases()
    for name, (file, write, _, _) in cases.items():
        folder = root / ("a" if len(name) % 2 else "b")
        folder.mkdir(exist_ok=True)
        write(folder / file)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, no PIL warning
        ds = ImageFolderDataset(root, image_size=S)
    by_file = {p.split("/")[-1]: ds[i][0] for i, (p, _) in enumerate(ds.samples)}
    return {name: (by_file[file], expected, tol) for name, (file, _, expected, tol) in cases.items()}


@pytest.mark.parametrize("name", list(_cases()))
def test_every_mode_decodes_to_its_values_in_0_1(decoded, name):
    x, expected, tol = decoded[name]
    assert x.shape == (3, S, S) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    assert float((x - expected.float()).abs().max()) <= tol + 1e-7, name


def test_a_16_bit_image_keeps_its_brightness(decoded):
    """The issue's case: a 16-bit gray picture of mean ~0.4 loaded at 0.99 through convert("RGB")."""
    x, _, _ = decoded["I;16 (16-bit gray PNG)"]
    true_mean = GRAY16.mean() / 65535
    assert 0.3 < true_mean < 0.5
    assert abs(float(x.mean()) - true_mean) < 1e-6
    with Image.fromarray(GRAY16) as im:
        assert np.asarray(im.convert("RGB")).mean() / 255 > 0.9  # what PIL alone gives: clipped


def test_8_bit_images_decode_exactly_as_pil_converts_them():
    """8-bit images stay on PIL's path, so their results are bitwise what they were."""
    for mode in ("RGB", "L", "RGBA", "P", "CMYK", "YCbCr"):
        im = Image.fromarray(RGB8).convert(mode)
        out = decode_rgb(im)
        assert isinstance(out, Image.Image) and out.mode == "RGB"
        assert np.array_equal(np.asarray(out), np.asarray(im.convert("RGB")))


@pytest.mark.parametrize(
    "image, message",
    [
        (Image.fromarray(np.full((4, 4), 2.5, dtype=np.float32)), r"float image with values in \[2.5, 2.5\]"),
        (Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32)), "float image"),
        (Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)), "no declared bit depth"),
    ],
)
def test_images_without_a_range_are_refused_not_clipped(image, message):
    with pytest.raises(DataError, match=message):
        decode_rgb(image)


def test_an_image_without_a_range_in_a_folder_is_skipped_and_counted(tmp_path):
    from juap.data import make_loader

    folder = tmp_path / "d" / "a"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(RGB8).save(folder / f"{i}.png")
    Image.fromarray(np.full((S, S), 3.0, dtype=np.float32)).save(folder / "hdr.tif")
    ds = ImageFolderDataset(tmp_path / "d", image_size=S)
    with pytest.warns(UserWarning, match=r"hdr.tif.*float image with values in \[3, 3\]"):
        x, y, skipped = next(iter(make_loader(ds, batch_size=3)))
    assert skipped == 1 and len(x) == 2
