"""LRM (Large Reconstruction Model, as OpenLRM v1.1 builds it and VFusion3D fine-tunes it): one
image and its camera in, a triplane out, rendered with fast3d's triplane volume renderer.

    image [B, 3, H, W] -> resize to image_size, ImageNet-normalise -> DINOv2 -> tokens [B, N, E]
    source camera (world-to-camera 3x4 + fx/W, fy/H, cx/W, cy/H) -> MLP -> modulation [B, M]
    3 h w learnable triplane tokens -> `layers` x [ModLN, cross-attention to the image tokens,
    ModLN, self-attention, ModLN, MLP] -> LayerNorm -> ConvTranspose2d x2 -> planes [B, 3, C, 2h, 2w]

ModLN is OpenLRM's adaLN: ``LayerNorm(x) * (1 + scale) + shift`` with (shift, scale) from the
camera embedding, a separate linear map per norm. ``LRMConfig.layout`` says whose conventions the
weights follow:

* ``"fast3d"`` (models trained with fast3d): transformers' ``Dinov2Model`` on ImageNet-normalised
  images, the image tokens projected to the decoder width once (``image_proj``), the camera as
  fast3d's world-to-camera matrix, planes in ``fast3d.triplane_sample``'s orientation.
* ``"openlrm"`` / ``"vfusion3d"`` (released weights, ``fast3d convert``): each cross-attention reads
  the encoder's tokens directly (OpenLRM's kdim = vdim = encoder width); the camera vector is the
  original's "principle" camera (camera-to-world, OpenGL axes, flattened 3x4, then fx/W, fy/H,
  cx/W, cy/H); the decoder's third plane is EG3D's (z, y) plane, transposed into fast3d's (y, z)
  after the upsampler. OpenLRM's encoder is DINOv2 with ``encoder_registers`` register tokens,
  dropped from the conditioning, on images in [0, 1] (not normalised: its Dinov2Wrapper feeds them
  so); VFusion3D's is ``Dinov2Model`` on ImageNet-normalised images (its image processor).

World and cameras are fast3d's (``fast3d.cameras``): objects in the unit box [-0.5, 0.5]^3,
+Z up, OpenCV world-to-camera viewmats. The triplane spans [-bound, bound]^3 (bound 0.6: a margin
past the object box, so the half-texel fade at the plane border never reaches the object); rays
are marched only inside that box (near/far from the ray-box intersection, as OpenLRM's "auto" ray
limits), and rays that miss it render the background with zero opacity and depth.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fast3d import checks
from fast3d.cameras import camera_rays
from fast3d.models import checkpoints
from fast3d.nn.triplane import TriplaneRenderer
from fast3d.ops import _validate
from fast3d.ops.triplane.api import triplane_sample

MODEL_TYPE = "lrm"
OBJECT_HALF_EXTENT = 0.5  # objects are normalised to [-0.5, 0.5]^3
NEAR_MIN = 0.01           # rays start at least this far from their origin (a camera inside the box)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LN_EPS = 1e-6
LAYOUTS = ("fast3d", "openlrm", "vfusion3d")
SOURCE_CAMERA_KEYS = ("azimuth_deg", "elevation_deg", "distance", "fov_y_deg")   # LRMConfig.source_camera
# OpenGL / Blender camera axes <-> OpenCV's (a self-inverse flip of y and z)
_GL_CV = (1.0, -1.0, -1.0, 1.0)

# OpenLRM v1.1 (model card and configs): decoder width / layers / heads, triplane channels, input
# resolution, DINOv2 ViT-S/14 (small) or ViT-B/14, 96 or 128 samples per ray split evenly between
# coarse and importance. encoder_image_size 518 is the position table of the released DINOv2
# weights (interpolated to image_size at run time), so `encoder_path` can point at them.
_PRESETS = {
    "tiny": dict(image_size=32, encoder_dim=32, encoder_layers=2, encoder_heads=2, encoder_patch_size=8,
                 encoder_image_size=32, camera_dim=32, width=64, layers=2, heads=4, token_res=8,
                 plane_channels=8, n_samples=8, n_importance=8),
    "small": dict(image_size=224, encoder_dim=384, encoder_layers=12, encoder_heads=6, width=512, layers=12,
                  heads=8, plane_channels=32),
    "base": dict(image_size=336, encoder_dim=768, encoder_layers=12, encoder_heads=12, width=768, layers=12,
                 heads=12, plane_channels=48),
    "large": dict(image_size=448, encoder_dim=768, encoder_layers=12, encoder_heads=12, width=1024, layers=16,
                  heads=16, plane_channels=80, n_samples=64, n_importance=64),
}


@dataclass(frozen=True)
class LRMConfig:
    """Sizes of an :class:`LRM`; the defaults are OpenLRM's "small". ``LRMConfig.preset(name)``
    gives "tiny" (tests), "small", "base" or "large"."""

    image_size: int = 224           # the encoder's input resolution; images are resized to it
    encoder_dim: int = 384          # DINOv2 hidden size (ViT-S/14)
    encoder_layers: int = 12
    encoder_heads: int = 6
    encoder_patch_size: int = 14
    encoder_image_size: int = 518   # image size of the encoder's position table
    encoder_path: str | None = None  # a local transformers Dinov2Model to start from (else random)
    camera_dim: int = 1024          # camera embedding (modulation) width
    width: int = 512                # decoder transformer width
    layers: int = 12
    heads: int = 8
    token_res: int = 32             # triplane tokens per plane: token_res x token_res
    plane_channels: int = 32        # C; planes are [3, C, 2 token_res, 2 token_res]
    render_hidden: int = 64         # renderer MLP (OpenLRM / EG3D's OSGDecoder)
    render_layers: int = 4
    n_samples: int = 48             # coarse samples per ray
    n_importance: int = 48          # importance samples per ray
    bound: float = 0.6              # the triplane spans [-bound, bound]^3
    grad_checkpointing: bool = False  # recompute decoder layers in the backward (training memory)
    encoder_registers: int = 0      # DINOv2 register tokens (OpenLRM v1.1's encoders have 4)
    layout: str = "fast3d"          # whose conventions the weights follow: one of LAYOUTS (module docstring)
    # the source camera inference assumes without one: {azimuth_deg, elevation_deg, distance,
    # fov_y_deg} in fast3d's world (a converted model's: the original's default); None: fast3d's
    source_camera: dict | None = None

    @classmethod
    def preset(cls, name: str, **overrides) -> LRMConfig:
        if name not in _PRESETS:
            raise ValueError(f"preset must be one of {sorted(_PRESETS)}; got {name!r}")
        return cls(**{**_PRESETS[name], **overrides})

    def __post_init__(self):
        for f in dataclasses.fields(self):
            x, lo = getattr(self, f.name), 0 if f.name in ("n_importance", "encoder_registers") else 1
            if f.type == "int" and (isinstance(x, bool) or not isinstance(x, int) or x < lo):
                raise ValueError(f"LRMConfig.{f.name} must be an integer >= {lo}; got {x!r}")
        checks.boolean("LRMConfig.grad_checkpointing", self.grad_checkpointing)
        checks.one_of("LRMConfig.layout", self.layout, LAYOUTS)
        if self.source_camera is not None:
            cam = self.source_camera
            if not isinstance(cam, dict) or set(cam) != set(SOURCE_CAMERA_KEYS):
                raise ValueError(f"LRMConfig.source_camera must be None or a dict of exactly {list(SOURCE_CAMERA_KEYS)}; "
                                 f"got {cam!r}")
            checks.real("LRMConfig.source_camera.azimuth_deg", cam["azimuth_deg"])
            checks.real("LRMConfig.source_camera.elevation_deg", cam["elevation_deg"], -90, 90, lo_open=True,
                        hi_open=True)
            checks.real("LRMConfig.source_camera.distance", cam["distance"], 0, lo_open=True)
            checks.real("LRMConfig.source_camera.fov_y_deg", cam["fov_y_deg"], 0, 180, lo_open=True, hi_open=True)
        if self.encoder_path is not None and not isinstance(self.encoder_path, str):
            raise ValueError(f"LRMConfig.encoder_path must be a path string or None; got {self.encoder_path!r}")
        checks.real("LRMConfig.bound", self.bound, OBJECT_HALF_EXTENT,
                    note="the triplane box must hold the object box [-0.5, 0.5]^3")
        if self.encoder_image_size % self.encoder_patch_size:
            raise ValueError(f"LRMConfig.encoder_image_size must be a multiple of encoder_patch_size "
                             f"{self.encoder_patch_size}; got {self.encoder_image_size}")
        # image_size need not be: the patch convolution drops the remainder (VFusion3D feeds 512 px
        # to a /14 encoder: 36 x 36 patches)
        if self.image_size < self.encoder_patch_size:
            raise ValueError(f"LRMConfig.image_size must be at least encoder_patch_size {self.encoder_patch_size}; "
                             f"got {self.image_size}")
        for dim, heads in (("encoder_dim", "encoder_heads"), ("width", "heads")):
            if getattr(self, dim) % getattr(self, heads):
                raise ValueError(f"LRMConfig.{dim} ({getattr(self, dim)}) must be divisible by "
                                 f"{heads} ({getattr(self, heads)})")

    def encoder_config(self):
        """transformers' config of the encoder: ``Dinov2Config``, or ``Dinov2WithRegistersConfig``
        with ``encoder_registers`` > 0."""
        from transformers import Dinov2Config, Dinov2WithRegistersConfig

        sizes = dict(hidden_size=self.encoder_dim, num_hidden_layers=self.encoder_layers,
                     num_attention_heads=self.encoder_heads, patch_size=self.encoder_patch_size,
                     image_size=self.encoder_image_size)
        if self.encoder_registers:
            return Dinov2WithRegistersConfig(**sizes, num_register_tokens=self.encoder_registers)
        return Dinov2Config(**sizes, use_mask_token=False)


def ray_box_bounds(rays_o: Tensor,  # [..., 3] ray origins
                   rays_d: Tensor,  # [..., 3] ray directions
                   bound: float) -> tuple[Tensor, Tensor, Tensor]:  # -> near, far [...], hit [...] bool
    """Where each ray is inside the box [-bound, bound]^3 (slab test), starting no closer than
    NEAR_MIN. Rays that miss get hit False and the interval [NEAR_MIN, NEAR_MIN + 1], only so that
    the renderer's near < far holds: LRM.render overwrites their outputs with the background."""
    d = torch.where(rays_d.abs() < 1e-12, torch.copysign(torch.full_like(rays_d, 1e-12), rays_d), rays_d)
    t1, t2 = (-bound - rays_o) / d, (bound - rays_o) / d
    near = torch.minimum(t1, t2).amax(-1).clamp_min(NEAR_MIN)
    far = torch.maximum(t1, t2).amin(-1)
    hit = far > near
    return torch.where(hit, near, NEAR_MIN), torch.where(hit, far, NEAR_MIN + 1.0), hit


class _Attention(nn.Module):
    """Multi-head attention without biases (OpenLRM's nn.MultiheadAttention(bias=False)) on SDPA."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim, bias=False)   # rows [keys; values], each head-major
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor,     # [B, N, D] queries
                ctx: Tensor,         # [B, M, kv_dim] keys and values
                ) -> Tensor:         # -> [B, N, D]
        B, N, D = x.shape
        q = self.q(x).view(B, N, self.heads, -1).transpose(1, 2)
        k, v = self.kv(ctx).view(B, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))


class _ModLN(nn.Module):
    """LayerNorm modulated by a conditioning vector: norm(x) * (1 + scale) + shift."""

    def __init__(self, dim: int, mod_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(mod_dim, 2 * dim))

    def forward(self, x: Tensor,    # [B, N, D]
                mod: Tensor,        # [B, M]
                ) -> Tensor:        # -> [B, N, D]
        shift, scale = self.mlp(mod)[:, None].chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class _DecoderLayer(nn.Module):
    """OpenLRM's ConditionModulationBlock: cross-attention, self-attention, MLP, each pre-ModLN."""

    def __init__(self, dim: int, heads: int, mod_dim: int, cond_dim: int | None = None):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (_ModLN(dim, mod_dim) for _ in range(3))
        self.cross_attn = _Attention(dim, heads, cond_dim)
        self.self_attn = _Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor,     # [B, L, D] triplane tokens
                cond: Tensor,        # [B, N, cond_dim] image tokens
                mod: Tensor,         # [B, M] camera embedding
                ) -> Tensor:         # -> [B, L, D]
        x = x + self.cross_attn(self.norm1(x, mod), cond)
        h = self.norm2(x, mod)
        x = x + self.self_attn(h, h)
        return x + self.mlp(self.norm3(x, mod))


def _tensor(name: str, x, shape: tuple, desc: str) -> Tensor:
    """`x` must be a floating tensor of `shape` (None: any size)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {desc}; got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor; got {x.dtype}")
    if x.dim() != len(shape) or any(s is not None and a != s for a, s in zip(x.shape, shape)):
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{name} must have shape {desc} = {want}; got {tuple(x.shape)}")
    return x


class LRM(nn.Module):
    """Image + source camera -> triplane (``forward``); triplane -> images (``render``) or a
    point cloud (``extract_points``). See the module docstring for the architecture."""

    def __init__(self, config: LRMConfig):
        super().__init__()
        if not isinstance(config, LRMConfig):
            raise ValueError(f"config must be an LRMConfig; got {type(config).__name__}")
        self.config = c = config
        self.encoder = self._build_encoder(c)
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        projected = c.layout == "fast3d"
        self.image_proj = nn.Linear(c.encoder_dim, c.width) if projected else None
        self.camera_embed = nn.Sequential(nn.Linear(16, c.camera_dim), nn.SiLU(), nn.Linear(c.camera_dim, c.camera_dim))
        self.tokens = nn.Parameter(torch.randn(3 * c.token_res ** 2, c.width) * c.width ** -0.5)
        self.layers = nn.ModuleList(_DecoderLayer(c.width, c.heads, c.camera_dim, None if projected else c.encoder_dim)
                                    for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.width, eps=_LN_EPS)
        self.upsample = nn.ConvTranspose2d(c.width, c.plane_channels, kernel_size=2, stride=2)
        self.renderer = TriplaneRenderer(c.plane_channels, c.render_hidden, c.render_layers, c.n_samples,
                                         c.n_importance, c.bound)
        for layer in self.renderer.decoder.layers:  # OSGDecoder's init: zero biases
            nn.init.zeros_(layer.bias)

    @staticmethod
    def _build_encoder(c: LRMConfig):
        from transformers import Dinov2Model, Dinov2WithRegistersModel

        want = c.encoder_config()
        cls = Dinov2WithRegistersModel if c.encoder_registers else Dinov2Model
        if c.encoder_path is None:
            return cls(want)
        if not os.path.isdir(c.encoder_path):
            raise ValueError(f"encoder_path must be a local transformers Dinov2Model directory; "
                             f"{c.encoder_path!r} is not a directory")
        extra = {} if c.encoder_registers else {"use_mask_token": False}
        encoder = cls.from_pretrained(c.encoder_path, local_files_only=True, dtype=torch.float32, **extra)
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size",
                "mlp_ratio", "use_swiglu_ffn")
        got, expected = ({k: getattr(cfg, k) for k in keys} for cfg in (encoder.config, want))
        if got != expected:
            raise ValueError(f"encoder_path {c.encoder_path!r} holds a DINOv2 with {got}; the LRMConfig asks for "
                             f"{expected}")
        return encoder

    @staticmethod
    def camera_vector(viewmat: Tensor,  # [B, 4, 4] world-to-camera, OpenCV
                      K: Tensor,        # [B, 3, 3] intrinsics in pixels of a width x height image
                      width: int, height: int, layout: str = "fast3d") -> Tensor:  # -> [B, 16]
        """The source camera as the decoder sees it: for the "fast3d" layout the world-to-camera
        3x4 flattened row-major, for the original layouts the camera-to-world 3x4 with OpenGL
        camera axes (OpenLRM's build_camera_principle of its c2w cameras); then fx / width,
        fy / height, cx / width, cy / height."""
        intr = torch.stack([K[:, 0, 0] / width, K[:, 1, 1] / height, K[:, 0, 2] / width, K[:, 1, 2] / height], -1)
        if layout != "fast3d":
            flip = torch.tensor(_GL_CV, dtype=torch.float64, device=viewmat.device)
            viewmat = (torch.linalg.inv(viewmat.double()) * flip).to(viewmat.dtype)     # c2w @ diag(flip)
        return torch.cat([viewmat[:, :3, :4].reshape(-1, 12), intr], -1)

    def forward(self, image: Tensor,    # [B, 3, H, W] in [0, 1], any size (resized to image_size)
                viewmat: Tensor,        # [B, 4, 4] source camera, world-to-camera (OpenCV)
                K: Tensor,              # [B, 3, 3] source intrinsics, pixels of image
                ) -> Tensor:            # -> planes [B, 3, C, 2 token_res, 2 token_res]
        c = self.config
        _tensor("image", image, (None, 3, None, None), "[B, 3, H, W]")
        B, _, H, W = image.shape
        if B == 0 or H == 0 or W == 0:
            raise ValueError(f"image must have B, H, W >= 1; got shape {tuple(image.shape)}")
        _tensor("viewmat", viewmat, (B, 4, 4), "[B, 4, 4] with B from image")
        _tensor("K", K, (B, 3, 3), "[B, 3, 3] with B from image")
        _validate.finite("viewmat", viewmat)
        _validate.finite("K", K)
        cam = self.camera_vector(viewmat, K, W, H, c.layout).to(image.dtype)
        if (H, W) != (c.image_size, c.image_size):
            image = F.interpolate(image, size=(c.image_size, c.image_size), mode="bilinear", align_corners=False,
                                  antialias=True)
        pixels = image if c.layout == "openlrm" else (image - self.image_mean) / self.image_std
        feats = self.encoder(pixel_values=pixels).last_hidden_state             # [B, 1 + R + N, E]
        if c.encoder_registers:                                                   # the class and patch tokens
            feats = torch.cat([feats[:, :1], feats[:, 1 + c.encoder_registers:]], 1)
        cond = feats if self.image_proj is None else self.image_proj(feats)      # [B, 1 + N, D or E]
        mod = self.camera_embed(cam)                                              # [B, M]
        x = self.tokens.expand(B, -1, -1)                                         # [B, 3 h w, D]
        for layer in self.layers:
            if c.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cond, mod, use_reentrant=False)
            else:
                x = layer(x, cond, mod)
        x = self.norm(x)
        h = c.token_res
        x = x.view(B * 3, h, h, c.width).permute(0, 3, 1, 2)                      # [3B, D, h, h]
        planes = self.upsample(x).view(B, 3, c.plane_channels, 2 * h, 2 * h)
        if c.layout != "fast3d":   # EG3D's third plane is (u, v) = (z, y): fast3d's (y, z) is its transpose
            planes = torch.cat([planes[:, :2], planes[:, 2:].transpose(-1, -2)], 1)
        return planes

    def check_planes(self, planes, batch: bool = True) -> Tensor:
        """``planes`` if they are this model's triplanes ([B, 3, C, 2 token_res, 2 token_res], or
        one sample's [3, C, ...] with ``batch=False``); ValueError naming ``planes`` otherwise."""
        c = self.config
        res = 2 * c.token_res
        shape = (3, c.plane_channels, res, res)
        if batch:
            return _tensor("planes", planes, (None, *shape), f"[B, 3, C, {res}, {res}] with C = {c.plane_channels}")
        return _tensor("planes", planes, shape, f"[3, C, {res}, {res}] (one sample) with C = {c.plane_channels}")

    def render(self, planes: Tensor,        # [B, 3, C, 2 token_res, 2 token_res] from forward
               viewmats: Tensor,            # [B, V, 4, 4] world-to-camera (OpenCV)
               Ks: Tensor,                  # [B, V, 3, 3] intrinsics, pixels of a width x height image
               width: int, height: int,
               background: Tensor | None = None,  # [3] or [B, 3] colour behind the object (default black)
               patch: tuple[int, int, int] | None = None,  # (y0, x0, size): render only that crop
               generator: torch.Generator | None = None,   # the sample jitter in training mode
               deterministic: bool | None = None,  # default: jitter samples in training, not in eval
               ) -> dict:
        """Volume-render V views of each sample: one ``fast3d.render_triplane`` call over the rays
        of all views. Returns dict(images [B, V, 3, h, w], opacity [B, V, 1, h, w], depth
        [B, V, 1, h, w]) with (h, w) = (height, width), or (size, size) for a patch (LRM's patch
        training: rows y0..y0+size, columns x0..x0+size of the full frame)."""
        planes = self.check_planes(planes)
        B = planes.shape[0]
        _tensor("viewmats", viewmats, (B, None, 4, 4), "[B, V, 4, 4] with B from planes")
        V = viewmats.shape[1]
        _tensor("Ks", Ks, (B, V, 3, 3), "[B, V, 3, 3] with B, V from viewmats")
        width, height = checks.positive_int("width", width), checks.positive_int("height", height)
        y0, x0, h, w = 0, 0, height, width
        if patch is not None:
            if not (isinstance(patch, (tuple, list)) and len(patch) == 3 and all(
                    isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in patch)):
                raise ValueError(f"patch must be a tuple of 3 integers (y0, x0, size); got {patch!r}")
            y0, x0, size = (int(p) for p in patch)
            if size < 1 or y0 < 0 or x0 < 0 or y0 + size > height or x0 + size > width:
                raise ValueError(f"patch (y0, x0, size) must satisfy size >= 1, 0 <= y0, y0 + size <= height = "
                                 f"{height}, 0 <= x0, x0 + size <= width = {width}; got {patch!r}")
            h = w = size
        if background is not None:
            one = isinstance(background, Tensor) and background.dim() == 1
            _tensor("background", background, (3,) if one else (B, 3), "[3] or [B, 3] with B from planes")
        R = V * h * w
        Ks = Ks.clone()
        Ks[..., 0, 2] -= x0                                                       # the crop's principal point
        Ks[..., 1, 2] -= y0
        rays_o, rays_d = (r.reshape(B, R, 3) for r in camera_rays(viewmats, Ks, w, h))
        near, far, hit = ray_box_bounds(rays_o, rays_d, self.config.bound)
        bg = background if background is None or background.dim() == 1 else background[:, None].expand(B, R, 3)
        out = self.renderer(planes, rays_o, rays_d, near, far, bg, deterministic, generator)
        miss = ~hit[..., None]
        color = out["color"].masked_fill(miss, 0.0)
        if bg is not None:
            color = torch.where(miss, bg.to(color.dtype), color)

        def image(x: Tensor) -> Tensor:                                           # [B, R, k] -> [B, V, k, h, w]
            return x.view(B, V, h, w, -1).permute(0, 1, 4, 2, 3)

        return dict(images=image(color), opacity=image(out["opacity"].masked_fill(miss, 0.0)),
                    depth=image(out["depth"].masked_fill(miss, 0.0)))

    @torch.no_grad()
    def extract_points(self, planes: Tensor,   # [3, C, 2 token_res, 2 token_res] one sample's planes
                       resolution: int = 64,
                       threshold: float = 3.0,
                       chunk: int = 1 << 18,
                       ) -> tuple[Tensor, Tensor]:  # -> points [N, 3], colors [N, 3] in [0, 1]
        """A coloured point cloud of the surface: the decoder's density sigma at the voxel centres
        of a resolution^3 grid over [-bound, bound]^3, occupied where sigma > threshold (3.0:
        OpenLRM's mesh threshold), kept where some of the 26 neighbours is empty (the shell; voxels
        on the grid border count as surface), coloured by the decoder's rgb there."""
        planes = self.check_planes(planes, batch=False)
        resolution = checks.positive_int("resolution", resolution)
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold):
            raise ValueError(f"threshold must be a real number; got {threshold!r}")
        b = self.config.bound
        axis = (torch.arange(resolution, device=planes.device, dtype=torch.float32) + 0.5) * (2 * b / resolution) - b
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).view(-1, 3)
        sigma, _ = self.decode_points(planes, grid, chunk)
        occ = (sigma > threshold).view(1, 1, resolution, resolution, resolution).float()
        interior = -F.max_pool3d(-F.pad(occ, (1,) * 6), 3, stride=1)                  # all 27 occupied
        keep = ((occ > 0) & (interior == 0)).view(-1)
        points = grid[keep]
        _, colors = self.decode_points(planes, points, chunk)
        return points, colors.float().clamp(0, 1)

    def decode_points(self, planes: Tensor,   # [3, C, 2 token_res, 2 token_res] one sample's planes
                      points: Tensor,         # [M, 3] world points
                      chunk: int = 1 << 18,
                      ) -> tuple[Tensor, Tensor]:  # -> density [M], rgb [M, 3]
        """The renderer's decoder at world points (what the volume renderer integrates), ``chunk``
        points a call so the memory stays bounded for any M."""
        decoder, b = self.renderer.decoder, self.config.bound
        out = [decoder(triplane_sample(planes[None], points[None, i:i + chunk], "concat", b))
               for i in range(0, points.shape[0], chunk)]
        if not out:
            return points.new_zeros(0), points.new_zeros(0, 3)
        return torch.cat([sigma[0] for sigma, _ in out]), torch.cat([rgb[0] for _, rgb in out])

    def save_pretrained(self, path: str) -> None:
        """``path/config.yaml`` + ``path/model.safetensors``; the encoder's weights are in the
        latter, so the saved config drops ``encoder_path``."""
        checkpoints.save_pretrained(path, MODEL_TYPE, dataclasses.replace(self.config, encoder_path=None),
                                    self.state_dict())

    @classmethod
    def from_pretrained(cls, path: str) -> LRM:
        config = checkpoints.read_config(path, MODEL_TYPE, LRMConfig)
        model = cls(dataclasses.replace(config, encoder_path=None))
        checkpoints.load_state(model, checkpoints.read_weights(path), path)
        return model
