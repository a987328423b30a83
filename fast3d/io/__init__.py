"""File formats: 3D Gaussian splat PLY files (the layout of the INRIA 3DGS code and its viewers),
coloured point-cloud PLY files and vertex-coloured triangle-mesh PLY files."""

from fast3d.io.mesh_ply import load_mesh_ply, save_mesh_ply
from fast3d.io.ply import load_ply, save_ply, save_points_ply

__all__ = ["load_mesh_ply", "load_ply", "save_mesh_ply", "save_ply", "save_points_ply"]
