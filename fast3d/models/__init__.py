"""Models built from diffusers/transformers parts and fast3d ops: ``lgm`` (Gaussian reconstruction),
``lrm`` (triplane reconstruction) and ``mvdit`` (multi-view diffusion transformer). Import the
submodule you need; nothing is imported here."""
