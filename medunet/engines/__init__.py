"""Engines: Ignite/MONAI trainers and evaluators as used by the bundles — the one training path — with what
medunet adds (a mixed-precision training step, a budget in epochs or seconds driving learning rate,
validation and stopping, atomic checkpoints with automatic resume, early stopping, history + training
curve, MLflow tracking, torchrun helpers in :mod:`medunet.engines.distributed`) and the helpers bundle
configs call (locate the bundle, generate phantoms when there is
no dataset, resolve the plan, split the datalist)."""

from medunet.engines import distributed
from medunet.engines.builders import Progress, segmentation_postprocessing, shared_handler
from medunet.engines.handlers import (
    CheckpointManager,
    EpochSeeder,
    HistoryLogger,
    is_rank0,
    plot_history,
    trained_seconds,
    unwrap,
)
from medunet.engines.losses import (
    CroppedLoss,
    DeepSupervisionDiceCE,
    WeightedCrossEntropyLoss,
    WeightMapLoss,
    build_loss,
    center_crop_to,
    dice_ce_loss,
)
from medunet.engines.tracking import MLflowTracker, default_tracking_uri, flatten_params
from medunet.engines.training import TrainingBudget, TrainStep, float32_norms, poly_lr
from medunet.engines.workflow import (
    PHANTOM_KINDS,
    list_images,
    locate_bundle,
    one_line_errors,
    parse_overrides,
    prepare_batch_with_weights,
    prepare_dataset,
    resolve_plan,
    run_bundle_workflow,
    split_datalist,
    trained_plan_file,
)

__all__ = [
    "CheckpointManager", "EpochSeeder", "HistoryLogger", "MLflowTracker", "Progress", "is_rank0", "unwrap",
    "plot_history", "CroppedLoss", "WeightMapLoss", "build_loss", "center_crop_to", "dice_ce_loss",
    "default_tracking_uri", "flatten_params", "segmentation_postprocessing", "locate_bundle",
    "prepare_dataset", "resolve_plan", "trained_plan_file", "split_datalist", "list_images",
    "prepare_batch_with_weights", "PHANTOM_KINDS", "parse_overrides", "run_bundle_workflow",
    "distributed", "shared_handler", "DeepSupervisionDiceCE", "WeightedCrossEntropyLoss", "TrainStep", "TrainingBudget", "float32_norms", "poly_lr",
    "one_line_errors", "trained_seconds",
]
