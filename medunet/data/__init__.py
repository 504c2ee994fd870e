"""Data: plans, datalists (MSD layout), CT/MRI transform pipelines, the seed's augmentations, planning,
dataset checks and the built-in phantom generator."""

from medunet.data.datalist import (
    every_nth_split,
    find_dataset_items,
    kfold_split,
    load_datalist,
    pair_folders,
    read_dataset_json,
)
from medunet.data.plan import Plan, normalize_intensity

__all__ = ["Plan", "normalize_intensity"]
__all__ += ["load_datalist", "read_dataset_json", "pair_folders", "kfold_split", "every_nth_split", "find_dataset_items"]
