"""Training recipes: LGM and LRM reconstruction, TTR multi-view diffusion (fast3d.training.loop.Recipe)."""
