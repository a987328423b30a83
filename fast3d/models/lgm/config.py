"""LGMConfig: the sizes of an LGM model, with the paper's "big" model and a CPU-sized "tiny" one."""

from __future__ import annotations

from dataclasses import dataclass

from fast3d import checks
from fast3d.cameras import DEFAULT_DISTANCE, DEFAULT_FOV_Y_DEG

# The Gaussian heads (fast3d.models.lgm.model): "anchored" is fast3d's (pixel-anchored positions, a
# colour prior; for models trained with fast3d), "original" LGM's own (released checkpoints,
# model_fp16_fixrot.safetensors), "original-prefix" LGM's head as the code that trained the first
# release (model_fp16.safetensors) computed it: quaternions normalised across the sample's Gaussians.
HEADS = ("anchored", "original", "original-prefix")
# LGM's camera radius (3DTopia/LGM core/options.py cam_radius): a converted model's first input
# camera distance, and with it the distance of the default input rig
LGM_CAMERA_RADIUS = 1.5


def _channels(name: str, x, groups: int) -> None:
    if not isinstance(x, tuple) or not x:
        raise ValueError(f"LGMConfig.{name} must be a non-empty tuple of channel counts; got {x!r}")
    for c in x:
        checks.positive_int(f"LGMConfig.{name}", c)
        if c % groups:
            raise ValueError(f"LGMConfig.{name} must be multiples of norm_groups={groups} (GroupNorm); got {x}")


@dataclass(frozen=True)
class LGMConfig:
    """Sizes of an LGM model. The defaults are the paper's big model (``preset("big")``).

    The U-Net has ``len(down_channels)`` levels (one downsampling between consecutive levels) and
    ``len(up_channels)`` up blocks (one upsampling between consecutive ones), so its output is
    ``splat_size = input_size * 2 ** (len(up_channels) - len(down_channels))`` pixels wide: one
    Gaussian per output pixel and view. The ``attention_levels`` lowest-resolution levels (down
    blocks, the middle block, up blocks) have cross-view self-attention with ``attention_heads``
    heads of ``channels // attention_heads`` dims. ``head`` is the Gaussian head, one of
    ``HEADS`` (see there).
    """

    input_size: int = 256              # input images are input_size x input_size
    num_input_views: int = 4
    splat_size: int = 128              # Gaussians per view: splat_size x splat_size
    render_size: int = 512             # supervision renders are render_size x render_size
    num_sup_views: int = 8             # supervision views per sample
    down_channels: tuple[int, ...] = (64, 128, 256, 512, 1024, 1024)
    up_channels: tuple[int, ...] = (1024, 1024, 512, 256, 128)
    layers_per_block: int = 2          # ResNet blocks per down block (up blocks have one more)
    attention_levels: int = 3
    attention_heads: int = 16
    norm_groups: int = 32
    fov_y_deg: float = DEFAULT_FOV_Y_DEG
    camera_distance: float = DEFAULT_DISTANCE  # the first input camera's distance after normalize_cameras
    activation_checkpointing: bool = False
    head: str = "anchored"             # one of HEADS

    @classmethod
    def preset(cls, name: str) -> LGMConfig:
        """``"big"``: LGM's model, 256 px in, 128 x 128 Gaussians per view (65,536 for 4 views).
        ``"lgm-big"``: the same network with LGM's own head and camera radius 1.5, the layout the
        released checkpoints convert to (``fast3d convert lgm``).
        ``"tiny"``: 64 px in, 32 x 32 Gaussians per view, attention at the lowest level only;
        small enough to train on a CPU."""
        if name == "big":
            return cls()
        if name == "lgm-big":
            return cls(camera_distance=LGM_CAMERA_RADIUS, head="original")
        if name == "tiny":
            return cls(input_size=64, splat_size=32, render_size=64, num_sup_views=4, down_channels=(16, 32, 64),
                       up_channels=(64, 32), layers_per_block=1, attention_levels=1, attention_heads=4, norm_groups=8)
        raise ValueError(f"LGMConfig.preset name must be one of ['tiny', 'big', 'lgm-big']; got {name!r}")

    @property
    def num_gaussians(self) -> int:
        """Gaussians per sample: one per output pixel of each input view."""
        return self.num_input_views * self.splat_size ** 2

    def __post_init__(self):
        for name in ("input_size", "num_input_views", "splat_size", "render_size", "num_sup_views",
                     "layers_per_block", "attention_heads", "norm_groups"):
            checks.positive_int(f"LGMConfig.{name}", getattr(self, name))
        _channels("down_channels", self.down_channels, self.norm_groups)
        _channels("up_channels", self.up_channels, self.norm_groups)
        n_down, n_up = len(self.down_channels), len(self.up_channels)
        if n_up > n_down:
            raise ValueError(f"LGMConfig.up_channels must have at most len(down_channels) = {n_down} entries "
                             f"(each up block consumes one level's skips); got {n_up}")
        stride = 2 ** (n_down - 1)
        if self.input_size % stride:
            raise ValueError(f"LGMConfig.input_size must be a multiple of 2^(len(down_channels) - 1) = {stride}; "
                             f"got {self.input_size}")
        expected = self.input_size * 2 ** (n_up - 1) // stride
        if self.splat_size != expected:
            raise ValueError(f"LGMConfig.splat_size must be input_size * 2^(len(up_channels) - len(down_channels)) "
                             f"= {expected}; got {self.splat_size}")
        checks.integer("LGMConfig.attention_levels", self.attention_levels, 0, n_down)
        k = self.attention_levels
        attended = set(self.down_channels[n_down - k:]) | set(self.up_channels[:k])
        bad = sorted(c for c in attended if c % self.attention_heads)
        if bad:
            raise ValueError(f"LGMConfig.attention_heads={self.attention_heads} must divide the channels of every "
                             f"attention level; got channels {bad}")
        for name in ("fov_y_deg", "camera_distance"):
            checks.real(f"LGMConfig.{name}", getattr(self, name), 0.0, lo_open=True)
        if self.fov_y_deg >= 180:
            raise ValueError(f"LGMConfig.fov_y_deg must be below 180; got {self.fov_y_deg!r}")
        checks.boolean("LGMConfig.activation_checkpointing", self.activation_checkpointing)
        checks.one_of("LGMConfig.head", self.head, HEADS)

