"""Inference of the reconstruction models (``fast3d infer``): images in, Gaussians or a triplane
out, with a turntable video and stage latencies. ``common`` holds what every model shares;
``lgm`` and ``lrm`` the model-specific pipelines, chosen by the checkpoint's ``model_type``."""
