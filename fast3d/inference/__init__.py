"""Inference of the trained models. ``lgm`` and ``lrm`` (``fast3d infer`` / ``fast3d eval``):
images in, Gaussians or a triplane out, with a turntable video and stage latencies, chosen by the
checkpoint's ``model_type``; ``ttr`` (``fast3d sample``): multi-view images from the TTR-trained
DiT; ``common`` holds what they share."""
