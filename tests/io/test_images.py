"""io.images.read_image: every PIL mode converted to RGBA, limits checked before decoding, every
truncation and byte flip of a PNG either decodes or raises a ValueError naming the input."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fast3d.io.images import composite, read_image


def _png(img) -> bytes:
    b = io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


def test_modes_convert_to_rgba(gen):
    grey = (torch.rand(7, 5, generator=gen) * 255).round().to(torch.uint8).numpy()
    # 8-bit grey: RGB equal to the grey value, alpha 1.
    t = read_image(_png(Image.fromarray(grey)))
    assert t.shape == (4, 7, 5) and torch.equal(t[0], torch.from_numpy(grey).float() / 255)
    assert torch.equal(t[0], t[2]) and (t[3] == 1).all()
    # 16-bit grey: scaled by 1/65535, not clipped to 8 bits.
    g16 = (torch.rand(7, 5, generator=gen) * 65535).round().to(torch.int32).numpy().astype(np.uint16)
    t = read_image(_png(Image.fromarray(g16)))
    assert torch.allclose(t[1], torch.from_numpy(g16.astype(np.float32)) / 65535, atol=1e-6)
    # Palette with a transparent index: alpha 0 exactly there.
    p = Image.fromarray(grey % 4).convert("P")
    p.info["transparency"] = 0
    t = read_image(_png(p))
    assert torch.equal(t[3] == 0, torch.from_numpy(grey % 4 == 0))
    # RGBA keeps straight alpha; composite puts it over white.
    rgba = (torch.rand(7, 5, 4, generator=gen) * 255).round().to(torch.uint8).numpy()
    t = read_image(_png(Image.fromarray(rgba, "RGBA")))
    assert torch.equal(t, torch.from_numpy(rgba).permute(2, 0, 1).float() / 255)
    assert torch.allclose(composite(t), t[:3] * t[3:] + 1 - t[3:])


def test_limits_and_empty_inputs(tmp_path):
    big = _png(Image.new("L", (300, 200)))
    with pytest.raises(ValueError, match=r"--image .*300x200 = 60000 pixels is over the limit of 1000"):
        read_image(big, name="--image", max_pixels=1000)
    with pytest.raises(ValueError, match="bytes is over the limit"):
        read_image(big, name="--image", max_bytes=10)
    with pytest.raises(ValueError, match="empty"):
        read_image(b"", name="--image")
    with pytest.raises(ValueError, match="is not a file"):
        read_image(str(tmp_path / "missing.png"), name="--image")
    with pytest.raises(ValueError, match="not a readable image"):
        read_image(b"not an image at all", name="--image")
    # A format PIL reads but no user image needs (EPS would run Ghostscript): refused unopened.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    with pytest.raises(ValueError, match="not a readable image"):
        read_image(eps, name="--image")
    ico = io.BytesIO()
    Image.new("RGB", (16, 16)).save(ico, format="ICO")
    with pytest.raises(ValueError, match="not a readable image"):
        read_image(ico.getvalue(), name="--image")


def test_truncations_and_byte_flips(gen):
    """Every prefix of a small PNG and 200 seeded single-byte flips: a [4, H, W] image in [0, 1] or
    a ValueError that names the input; never another exception."""
    rgb = (torch.rand(6, 6, 3, generator=gen) * 255).round().to(torch.uint8).numpy()
    data = _png(Image.fromarray(rgb))
    cases = [data[:n] for n in range(len(data))]
    for _ in range(200):
        b = bytearray(data)
        i = int(torch.randint(0, len(b), (), generator=gen))
        b[i] ^= 1 + int(torch.randint(0, 255, (), generator=gen))
        cases.append(bytes(b))
    for c in cases:
        try:
            t = read_image(c, name="upload")
        except ValueError as e:
            assert str(e).startswith("upload")
        else:
            assert t.shape[0] == 4 and t.isfinite().all() and t.min() >= 0 and t.max() <= 1
