"""File formats: 3D Gaussian splat PLY files (the layout of the INRIA 3DGS code and its viewers) and
coloured point-cloud PLY files."""

from fast3d.io.ply import load_ply, save_ply, save_points_ply

__all__ = ["load_ply", "save_ply", "save_points_ply"]
