"""Data: plans, datalists (MSD layout), CT/MRI transform pipelines, the seed's augmentations, planning,
dataset checks and the built-in phantom generator."""

from medunet.data.plan import Plan, normalize_intensity

__all__ = ["Plan", "normalize_intensity"]
