"""The LGM model: multi-view images + cameras -> one 3D Gaussian per output pixel of each view,
and the rendering of those Gaussians for supervision."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fast3d.cameras import camera_rays, plucker_rays, rotmat_to_quat
from fast3d.models import checkpoints
from fast3d.models.lgm.config import LGMConfig
from fast3d.models.lgm.normalize import quat_multiply
from fast3d.models.lgm.unet import CrossViewAttention, UNet
from fast3d.ops.rasterization import rasterization

MODEL_TYPE = "lgm"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GAUSSIAN_KEYS = ("means", "quats", "scales", "opacities", "colors")
# Activations of the 14 output channels (LGM's, in fast3d's world: objects in the unit box
# [-0.5, 0.5]^3, cameras at 2.2 with a 49.1 deg field of view):
# * positions: a pixel-aligned anchor plus clamp(x, -1, 1). The anchor of an output pixel is the
#   point of its ray closest to the origin (the object's centre), so at initialisation each view's
#   Gaussians tile the plane through the centre facing that camera and take their colour from the
#   pixel they sit on; the offset then moves them into depth. LGM regresses absolute positions in
#   [-1, 1]; anchoring them learns the same output space far faster (colour and silhouette are
#   right from the first steps, as in pixel-aligned models such as Splatter Image). +-1 covers the
#   unit box (corners at 0.87 from the centre) from any anchor in the views (2.2 tan(24.55 deg) =
#   1.0 is the half-width the cameras see at the centre).
# * scales SCALE_FACTOR * softplus(x), LGM's 0.1 halved: at x = 0 a Gaussian's scale is 0.035,
#   about the spacing of one view's 32 x 32 grid spread over the unit box (1/32), so the tiny
#   model's Gaussians start out just touching (with 0.1 each would span ~3 cells); the big
#   model's 128 x 128 grid learns smaller scales from there.
# * opacities sigmoid, quaternions normalised (wxyz).
# * colours sigmoid(logit(c) + x), c the input colour under the Gaussian (area-averaged to the
#   splat grid): LGM's head predicts colour outright (0.5 tanh(x) + 0.5, the same range); starting
#   each Gaussian at its pixel's colour is the pixel-aligned prior, without which a small model's
#   renders first fade every Gaussian out and learn colour slowly.
SCALE_FACTOR = 0.05
# LGM's own head (3DTopia/LGM core/models.py): positions clamp(x, -1, 1), scales 0.1 softplus(x),
# opacities sigmoid, quaternions normalised (wxyz, as diff-gaussian-rasterization reads them),
# colours 0.5 tanh(x) + 0.5; channels in the same order as above.
ORIGINAL_SCALE_FACTOR = 0.1
# fast3d's normalised world -> LGM's, p_lgm = LGM_AXES @ p_fast3d: both put the first input camera
# on an axis looking at the origin, fast3d's at +X with +Z up, LGM's at +Z with +Y up (its
# provider's canonical pose, kiui's orbit_camera(0, 0)); so x -> z, y -> x, z -> y. A rotation:
# Pluecker rays and Gaussians move with it, scales, opacities and colours do not.
LGM_AXES = ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))


def _check_tensor(name: str, x, dims: int, desc: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != dims:
        got = f"shape {tuple(x.shape)}, {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating tensor of shape {desc}; got {got}")


def pixel_anchors(viewmats: Tensor,  # [B, V, 4, 4]
                  Ks: Tensor,        # [B, V, 3, 3] pixels of the input images
                  input_size: int, splat_size: int) -> Tensor:  # -> [B, V * p * p, 3]
    """For each output pixel, the point of its ray closest to the origin: o + d (-o . d)."""
    K = Ks.float().clone()
    K[..., :2, :] *= splat_size / input_size
    o, d = camera_rays(viewmats.float(), K, splat_size, splat_size)      # [B, V, p, p, 3]
    t = -(o * d).sum(-1, keepdim=True)
    return (o + d * t).flatten(1, 3)


def gaussians_from_features(x: Tensor,        # [B, V, 14, p, p]
                            anchors: Tensor,  # [B, V * p * p, 3]
                            pixels: Tensor,   # [B, V * p * p, 3] the input colour under each Gaussian, [0, 1]
                            ) -> dict:        # Gaussians, N = V p p
    """LGM's activations of the U-Net's output channels (position 3, opacity 1, scale 3,
    rotation 4, colour 3), Gaussians ordered by view, then row-major over the p x p grid."""
    B, V, C, p, _ = x.shape
    x = x.permute(0, 1, 3, 4, 2).reshape(B, V * p * p, C)
    pos, opacity, scale, rot, rgb = x.split([3, 1, 3, 4, 3], -1)
    return dict(means=anchors.to(pos.dtype) + pos.clamp(-1, 1), quats=F.normalize(rot, dim=-1),
                scales=SCALE_FACTOR * F.softplus(scale), opacities=torch.sigmoid(opacity[..., 0]),
                colors=torch.sigmoid(torch.logit(pixels.to(rgb.dtype), eps=1e-3) + rgb))


def lgm_axes(dtype=torch.float32, device=None) -> Tensor:  # -> [3, 3]
    """``LGM_AXES`` as a tensor: fast3d's normalised world -> LGM's."""
    return torch.tensor(LGM_AXES, dtype=dtype, device=device)


def viewmats_to_lgm_world(viewmats: Tensor) -> Tensor:  # [..., 4, 4] -> [..., 4, 4]
    """World-to-camera matrices of fast3d's normalised world re-expressed in LGM's world (same
    cameras, same OpenCV camera axes): ``viewmat @ T^-1`` with T the rotation ``LGM_AXES``."""
    T_inv = torch.eye(4, dtype=viewmats.dtype, device=viewmats.device)
    T_inv[:3, :3] = lgm_axes(viewmats.dtype, viewmats.device).T
    return viewmats @ T_inv


def _unnormalised_rotmat(q: Tensor) -> Tensor:  # [..., 4] wxyz, any norm -> [..., 3, 3]
    """The matrix diff-gaussian-rasterization builds from a quaternion it does not normalise
    (computeCov3D): the unit-quaternion rotation formula applied to q as it is."""
    w, x, y, z = q.unbind(-1)
    return torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).unflatten(-1, (3, 3))


def original_gaussians(x: Tensor,              # [B, V, 14, p, p] the U-Net's output
                       prefix_rotation: bool = False,
                       ) -> dict:              # Gaussians in fast3d's normalised world, N = V p p
    """LGM's own head (``ORIGINAL_SCALE_FACTOR`` above), in float32, then moved from LGM's world
    to fast3d's (``LGM_AXES``).

    ``prefix_rotation``: the head of LGM's code before commit 9a0797c ("fix rotation
    normalization", which the first release, model_fp16.safetensors, was trained with):
    ``F.normalize`` on [B, N, 4] without ``dim`` normalises each quaternion channel across the
    sample's N Gaussians, and LGM's rasterizer builds its rotation from the quaternion without
    normalising it, so each Gaussian's covariance was ``M diag(s^2) M^T`` with M
    :func:`_unnormalised_rotmat` of that tiny quaternion (nearly the identity). The Gaussians
    returned here carry exactly that covariance, as a rotation and scales from its
    eigendecomposition."""
    B, V, C, p, _ = x.shape
    dtype = x.dtype
    x = x.float().permute(0, 1, 3, 4, 2).reshape(B, V * p * p, C)
    pos, opacity, scale, rot, rgb = x.split([3, 1, 3, 4, 3], -1)
    scales = ORIGINAL_SCALE_FACTOR * F.softplus(scale)
    if prefix_rotation:
        M = _unnormalised_rotmat(F.normalize(rot, dim=1).double())                # [B, N, 3, 3]
        cov = M @ torch.diag_embed(scales.double() ** 2) @ M.transpose(-1, -2)
        evals, evecs = torch.linalg.eigh(cov)
        evecs = evecs * torch.linalg.det(evecs).sign()[..., None, None]          # a rotation: det +1
        quats, scales = rotmat_to_quat(evecs).float(), evals.clamp_min(0).sqrt().float()
    else:
        quats = F.normalize(rot, dim=-1)
    A = lgm_axes(torch.float32, x.device)
    out = dict(means=pos.clamp(-1, 1) @ A,                                       # A^T p, row vectors
               quats=quat_multiply(rotmat_to_quat(A.T).expand_as(quats), quats),
               scales=scales, opacities=torch.sigmoid(opacity[..., 0]), colors=0.5 * torch.tanh(rgb) + 0.5)
    return {k: v.to(dtype) for k, v in out.items()}


class LGM(nn.Module):
    """Large Multi-View Gaussian Model (Tang et al. 2024): an asymmetric U-Net with cross-view
    attention maps V posed images to V x splat_size^2 Gaussians.

    Cameras are expected in the normalised world of
    :func:`fast3d.models.lgm.normalize_cameras` (first view at the canonical pose, distance
    ``config.camera_distance``); the Gaussians come out in that world. ``config.head`` picks
    the head: fast3d's anchored one (:func:`gaussians_from_features`) or LGM's own
    (:func:`original_gaussians`, the released checkpoints converted by ``fast3d convert lgm``).

    Args:
        config: the architecture.
        attention_backend: the :func:`fast3d.multiview_attention` backend of the U-Net's
            cross-view attention (``"auto"``, ``"torch"``, ``"triton"``, ...); a runtime choice,
            not saved with the weights (see :meth:`set_attention_backend`).
    """

    def __init__(self, config: LGMConfig, attention_backend: str = "auto"):
        super().__init__()
        if not isinstance(config, LGMConfig):
            raise ValueError(f"config must be an LGMConfig; got {type(config).__name__}")
        self.config = config
        self.unet = UNet(config)
        self.set_attention_backend(attention_backend)
        with torch.no_grad():   # identity rotations at initialisation, not a random quaternion near 0
            self.unet.conv_out.bias[7] = 1.0
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)

    def set_attention_backend(self, backend: str) -> None:
        """Run every cross-view attention of the U-Net on :func:`fast3d.multiview_attention`'s
        ``backend`` from now on (the backend checks the inputs it gets when called)."""
        if not isinstance(backend, str) or not backend:
            raise ValueError(f"attention_backend must be a backend name of fast3d.multiview_attention "
                             f"(e.g. 'auto'); got {backend!r}")
        for m in self.modules():
            if isinstance(m, CrossViewAttention):
                m.backend = backend

    @property
    def attention_backend(self) -> str:
        """The backend the cross-view attention runs on ("auto" when the U-Net has no attention level)."""
        return next((m.backend for m in self.modules() if isinstance(m, CrossViewAttention)), "auto")

    def _check_inputs(self, images: Tensor, viewmats: Tensor, Ks: Tensor) -> None:
        cfg = self.config
        _check_tensor("images", images, 5, "[B, V, 3, H, W]")
        B, V, C, H, W = images.shape
        if C != 3:
            raise ValueError(f"images must have 3 (RGB) channels, shape [B, V, 3, H, W]; got {tuple(images.shape)}")
        if (H, W) != (cfg.input_size, cfg.input_size):
            raise ValueError(f"images must be {cfg.input_size} x {cfg.input_size} (config.input_size); "
                             f"got {H} x {W}")
        if V != cfg.num_input_views:
            what = "fewer" if V < cfg.num_input_views else "more"
            raise ValueError(f"images has {what} views than the model needs: expected V = config.num_input_views "
                             f"= {cfg.num_input_views}; got V = {V} (shape {tuple(images.shape)})")
        _check_tensor("viewmats", viewmats, 4, "[B, V, 4, 4]")
        if viewmats.shape != (B, V, 4, 4):
            raise ValueError(f"viewmats must have shape [B, V, 4, 4] = {(B, V, 4, 4)} to match images; "
                             f"got {tuple(viewmats.shape)}")
        _check_tensor("Ks", Ks, 4, "[B, V, 3, 3]")
        if Ks.shape != (B, V, 3, 3):
            raise ValueError(f"Ks must have shape [B, V, 3, 3] = {(B, V, 3, 3)} to match images; got {tuple(Ks.shape)}")

    def forward(self, images: Tensor,    # [B, V, 3, H, W] in [0, 1], H = W = config.input_size
                viewmats: Tensor,        # [B, V, 4, 4] world-to-camera (OpenCV), normalised world
                Ks: Tensor,              # [B, V, 3, 3] intrinsics of the input images, pixels
                ) -> dict:  # means [B, N, 3], quats [B, N, 4], scales [B, N, 3], opacities [B, N], colors [B, N, 3]
        """The Gaussians of each sample, N = V * splat_size^2, in the model's dtype."""
        self._check_inputs(images, viewmats, Ks)
        B, V, _, s, _ = images.shape
        original = self.config.head != "anchored"
        # the original head's network saw Pluecker rays of LGM's world (the same rays, rotated)
        vm = viewmats_to_lgm_world(viewmats.float()) if original else viewmats.float()
        rays = plucker_rays(vm, Ks.float(), s, s)                                # [B, V, 6, s, s]
        rgb = (images.float() - self.image_mean) / self.image_std               # [B, V, 3, s, s]
        x = torch.cat([rgb, rays], 2).flatten(0, 1).to(self.unet.conv_in.weight.dtype)  # [B*V, 9, s, s]
        if original:
            return original_gaussians(self.unet(x).unflatten(0, (B, V)), self.config.head == "original-prefix")
        p = self.config.splat_size
        anchors = pixel_anchors(viewmats, Ks, s, p)
        pixels = F.interpolate(images.float().flatten(0, 1), size=(p, p), mode="area")     # [B*V, 3, p, p]
        pixels = pixels.unflatten(0, (B, V)).permute(0, 1, 3, 4, 2).reshape(B, V * p * p, 3)
        return gaussians_from_features(self.unet(x).unflatten(0, (B, V)), anchors, pixels)

    @staticmethod
    def render(gaussians: dict,                   # means [B, N, 3], quats, scales, opacities, colors
               viewmats: Tensor,                  # [B, C, 4, 4] world-to-camera, OpenCV
               Ks: Tensor,                        # [B, C, 3, 3]
               width: int, height: int,
               backgrounds: Tensor | None = None,  # [B, C, 3]
               ) -> tuple[Tensor, Tensor]:        # -> images [B, C, 3, H, W], alphas [B, C, 1, H, W]
        """All scenes and views in one :func:`fast3d.rasterization` call, in float32."""
        missing = [k for k in GAUSSIAN_KEYS if k not in gaussians]
        if missing:
            raise ValueError(f"gaussians must have the keys {list(GAUSSIAN_KEYS)}; missing {missing}")
        means, quats, scales, opacities, colors = (gaussians[k].float() for k in GAUSSIAN_KEYS)
        images, alphas, _ = rasterization(means, quats, scales, opacities, colors, viewmats.float(), Ks.float(),
                                          width, height,
                                          backgrounds=None if backgrounds is None else backgrounds.float())
        return images.permute(0, 1, 4, 2, 3), alphas.permute(0, 1, 4, 2, 3)

    def save_pretrained(self, path: str) -> None:
        """Write ``path/config.yaml`` and ``path/model.safetensors``."""
        checkpoints.save_pretrained(path, MODEL_TYPE, self.config, self.state_dict())

    @classmethod
    def from_pretrained(cls, path: str) -> LGM:
        """Load a directory written by :meth:`save_pretrained` (ValueError for another model's)."""
        model = cls(checkpoints.read_config(path, MODEL_TYPE, LGMConfig))
        checkpoints.load_state(model, checkpoints.read_weights(path), path)
        return model


def lora_target_modules(model: nn.Module) -> list[str]:
    """Names of the cross-view attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out``)
    in ``model``, for ``peft.LoraConfig(target_modules=...)``."""
    return [f"{name}.{proj}" for name, module in model.named_modules() if isinstance(module, CrossViewAttention)
            for proj in ("to_q", "to_k", "to_v", "to_out")]
