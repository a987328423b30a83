"""fast3d.io.atomic: a file appears whole or not at all; fast3d.io.images: the one 8-bit rule."""

import os

import pytest
import torch

from fast3d.io.atomic import atomic_open, temp_path, write_atomic
from fast3d.io.images import to_uint8


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.json"
    write_atomic(path, b"old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_open(path) as f:
            f.write("half of the new")
            assert os.path.exists(temp_path(path)) and path.read_bytes() == b"old"
            raise RuntimeError("crash")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.json"]
    with atomic_open(path) as f:
        f.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["f.json"]
    assert os.path.basename(temp_path(path)) == f".f.json.tmp{os.getpid()}"   # what resumed jobs glob for


def test_to_uint8_rounds_to_nearest_and_moves_channels_last(gen):
    x = torch.rand(2, 3, 4, 5, generator=gen)
    x[0, 0, 0, :3] = torch.tensor([-0.5, 1.5, 0.5 / 255])    # clamped low, clamped high, a tie (0.5 -> 0, to even)
    got = to_uint8(x)
    assert got.shape == (2, 4, 5, 3) and got.dtype.name == "uint8"
    want = torch.floor(x.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    ties = (x.clamp(0, 1) * 255).frac().eq(0.5).permute(0, 2, 3, 1).numpy()
    assert (got[~ties] == want[~ties]).all() and got[0, 0, 0, 0] == 0 and got[0, 0, 1, 0] == 255
    assert got[0, 0, 2, 0] == 0
    levels = torch.arange(256, dtype=torch.float32).view(1, 1, 256) / 255     # 8-bit values survive a round trip
    assert (to_uint8(levels)[..., 0] == torch.arange(256).numpy()).all()
