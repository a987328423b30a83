"""LGM (Tang et al. 2024, "Large Multi-View Gaussian Model"): feed-forward reconstruction of 3D
Gaussians from V posed images (4 in the paper), one Gaussian per output pixel of each view.

    cfg = LGMConfig.preset("tiny")                                   # or "big": LGM's 65,536 Gaussians
    model = LGM(cfg)
    vm_in, T = normalize_cameras(viewmats_in, cfg.camera_distance)   # first view -> canonical pose
    gaussians = model(images, vm_in, Ks_in)                          # in the normalised world
    vm_sup = apply_transform_to_viewmats(viewmats_sup, T)            # supervision cameras, same world
    rgb, alpha = model.render(gaussians, vm_sup, Ks_sup, cfg.render_size, cfg.render_size)
    world = apply_transform_to_gaussians(gaussians, torch.linalg.inv(T))  # back to the asset's world

Modules: ``config`` (LGMConfig), ``unet`` (the network, CrossViewAttention), ``normalize`` (camera
normalisation), ``model`` (LGM, rendering, save/load, LoRA targets).
"""

from fast3d.models.lgm.config import LGMConfig
from fast3d.models.lgm.model import LGM, lora_target_modules
from fast3d.models.lgm.normalize import (
                                         apply_transform_to_gaussians,
                                         apply_transform_to_viewmats,
                                         canonical_viewmat,
                                         normalize_cameras,
)
from fast3d.models.lgm.unet import CrossViewAttention

__all__ = ["LGM", "LGMConfig", "CrossViewAttention", "apply_transform_to_gaussians", "apply_transform_to_viewmats",
           "canonical_viewmat", "lora_target_modules", "normalize_cameras"]
