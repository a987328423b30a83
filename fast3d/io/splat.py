"""3D Gaussians as a ``.splat`` file: the compact layout web splat viewers read (antimatter15's
``splat`` viewer and the viewers that copied it), 32 bytes a Gaussian, no header, little-endian:

    offset  size  what
    0       12    position x, y, z                 float32 x 3
    12      12    scale x, y, z (linear, not log)  float32 x 3
    24      4     colour R, G, B, alpha            uint8 x 4: round(255 * clamp(c, 0, 1)); alpha is the opacity
    28      4     rotation w, x, y, z              uint8 x 4: clamp(round(128 * q / |q| + 128), 0, 255)

Only the degree-0 colour is stored (no higher SH bands). Gaussians are written in the order given
(the viewers sort by depth themselves). A file of N Gaussians is exactly 32 N bytes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fast3d.io.ply import float_tensor

SPLAT_RECORD = np.dtype([("position", "<f4", (3,)), ("scale", "<f4", (3,)), ("rgba", "u1", (4,)),
                         ("rotation", "u1", (4,))])


def splat_bytes(means: Tensor,      # [N, 3]
                quats: Tensor,      # [N, 4] wxyz, any non-zero norm
                scales: Tensor,     # [N, 3] post-activation (> 0)
                opacities: Tensor,  # [N] in [0, 1]
                colors: Tensor,     # [N, 3] RGB in [0, 1] (clamped)
                ) -> bytes:
    """The ``.splat`` bytes of one scene (module docstring for the layout).

    Args:
        means, quats, scales, opacities, colors: the Gaussians, finite.

    Returns:
        32 * N bytes.
    """
    d = float_tensor("means", means, "[N, 3]")
    d = float_tensor("quats", quats, "[N, 4]", d)
    d = float_tensor("scales", scales, "[N, 3]", d)
    d = float_tensor("opacities", opacities, "[N]", d)
    float_tensor("colors", colors, "[N, 3]", d)
    N = d["N"]
    norm = quats.detach().double().norm(dim=-1, keepdim=True)
    if N and bool((norm == 0).any()):
        raise ValueError("quats has zero-length rows: a rotation quaternion needs a non-zero norm")
    out = np.empty(N, dtype=SPLAT_RECORD)
    out["position"] = means.detach().to("cpu", torch.float32).numpy()
    out["scale"] = scales.detach().to("cpu", torch.float32).numpy()
    rgba = torch.cat([colors.detach().double(), opacities.detach().double()[:, None]], 1)
    out["rgba"] = (rgba.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    q = (quats.detach().double() / norm * 128 + 128).round().clamp(0, 255)
    out["rotation"] = q.to(torch.uint8).cpu().numpy()
    return out.tobytes()


def load_splat(data: bytes) -> dict:
    """Decode ``.splat`` bytes: means [N, 3], scales [N, 3], colors [N, 3] and opacities [N] in
    [0, 1] (8-bit), quats [N, 4] wxyz (8-bit, unnormalised). ValueError if the length is not a
    multiple of 32."""
    if len(data) % SPLAT_RECORD.itemsize:
        raise ValueError(f"a .splat file is 32 bytes a Gaussian; got {len(data)} bytes (not a multiple of 32)")
    rec = np.frombuffer(data, dtype=SPLAT_RECORD)
    rgba = torch.from_numpy(rec["rgba"].astype(np.float32) / 255)
    return {"means": torch.from_numpy(rec["position"].copy()), "scales": torch.from_numpy(rec["scale"].copy()),
            "colors": rgba[:, :3].contiguous(), "opacities": rgba[:, 3].contiguous(),
            "quats": (torch.from_numpy(rec["rotation"].astype(np.float32)) - 128) / 128}
