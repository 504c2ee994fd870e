"""The grid a plan predicts on and resampling between grids: :mod:`medunet.data.grid` (the preprocessing
lives in ``data/``; this name is kept for callers of ``medunet.inference.geometry``)."""

from medunet.data.grid import PlanGrid, reoriented_affine, resample_grid

__all__ = ["PlanGrid", "resample_grid", "reoriented_affine"]
