"""A small CT bundle in the layout of medunet's bundles, for the label-server test when bundles/ct is absent.

Everything is built from medunet (Plan, transforms, networks), like bundles/ct: ``network_def`` comes
from ``plan.json``; preprocessing is :func:`medunet.data.transforms.infer_transforms`.
"""

from __future__ import annotations

import json
from pathlib import Path

from medunet.data import Plan
from medunet.networks import get_spec

LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}


def make_ct_bundle(root: Path, name: str = "ct") -> Path:
    bundle = root / name
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    plan = Plan(labels=LABELS, spatial_dims=3, modality="CT", target_spacing=[1.5, 1.5, 3.0],
                normalization={"scheme": "ct", "clip": [-200.0, 300.0], "mean": 50.0, "std": 80.0},
                patch_size=[32, 32, 16], batch_size=1,
                network={"name": "unet3d", **get_spec("unet3d").tiny_options})
    plan.save(bundle / "plan.json")
    channel_def = {str(v): k for k, v in LABELS.items()}
    meta = {
        "version": "0.0.1", "monai_version": "1.6.1", "pytorch_version": "2", "numpy_version": "2",
        "required_packages_version": {}, "task": "CT organ segmentation (test bundle)",
        "description": "tiny test bundle", "authors": "medunet tests", "copyright": "n/a",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": [32, 32, 16], "dtype": "float32", "value_range": [],
                                 "is_patch_data": True, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 4,
                                 "spatial_shape": [32, 32, 16], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": channel_def}},
        },
    }
    common = {
        "imports": ["$import medunet", "$import medunet.data.transforms", "$from medunet.data import Plan"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "plan": "$Plan.load(@bundle_root + '/plan.json')",
        "network_def": "$@plan.build_network()",
        "network": "$@network_def.to(@device)",
    }
    inference = {
        **common,
        "preprocessing": "$medunet.data.transforms.infer_transforms(@plan)",
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": "$@plan.patch_size", "sw_batch_size": 1,
                    "overlap": 0.25},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        ]},
    }
    train = {
        **common,
        "epochs": 1,
        "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
        "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": 1e-3},
        "train": {
            "preprocessing": "$medunet.data.transforms.train_transforms(@plan, augment=False)",
            "dataset": {"_target_": "Dataset", "data": [], "transform": "@train#preprocessing"},
            "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": 1,
                           "shuffle": True, "num_workers": 0},
            "handlers": [{"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
                          "interval": 1}],
            "trainer": {"_target_": "SupervisedTrainer", "max_epochs": "@epochs", "device": "@device",
                        "train_data_loader": "@train#dataloader", "network": "@network",
                        "loss_function": "@loss", "optimizer": "@optimizer", "train_handlers": "@train#handlers"},
        },
        "validate": {
            "preprocessing": "$medunet.data.transforms.val_transforms(@plan)",
            "dataset": {"_target_": "Dataset", "data": [], "transform": "@validate#preprocessing"},
            "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": 1,
                           "num_workers": 0},
            "inferer": {"_target_": "SlidingWindowInferer", "roi_size": "$@plan.patch_size", "sw_batch_size": 1},
            "postprocessing": {"_target_": "Compose", "transforms": [
                {"_target_": "AsDiscreted", "keys": ["pred", "label"], "argmax": [True, False],
                 "to_onehot": 4}]},
            "key_metric": {"val_mean_dice": {"_target_": "MeanDice", "include_background": False,
                                             "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}},
            "handlers": [{"_target_": "CheckpointSaver", "save_dir": "$@bundle_root + '/models'",
                          "save_dict": {"model": "@network"}, "save_key_metric": True,
                          "key_metric_filename": "model.pt"}],
            "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                          "val_data_loader": "@validate#dataloader", "network": "@network",
                          "inferer": "@validate#inferer", "postprocessing": "@validate#postprocessing",
                          "key_val_metric": "@validate#key_metric", "val_handlers": "@validate#handlers"},
        },
        "run": ["$@train#trainer.run()"],
    }
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    (bundle / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
    (bundle / "configs" / "train.json").write_text(json.dumps(train, indent=2))
    return bundle
