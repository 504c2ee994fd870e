"""The MONAI Label app that serves medunet bundles (runs inside the label environment).

``MedunetLabelApp`` is what MONAI Label's ``start_server --app <workdir>/app`` loads (the app folder's
``main.py`` imports it; :mod:`medunet.label.launch` writes that folder). For every bundle copied into
``<app>/model/<name>/`` it registers

* an infer task ``<name>`` (:class:`MedunetInferTask`: the network ``network_def`` of
  ``configs/inference.json`` with the weights ``models/model.pt``, predicted by medunet's Predictor as
  ``medunet segment`` does; labels from ``metadata.json``'s ``channel_def``); its ``/info/`` entry carries
  ``weights`` (``checkpoint``/``bundle``/``fine-tuned``/``random-init``) and says UNTRAINED when random;
* a train task ``<name>`` (MONAI Label's :class:`BundleTrainTask`: ``configs/train.json`` run with the
  datastore's labelled images, starting from the served weights, writing the best model back to
  ``models/model.pt``, which the infer task then reloads).

The datastore is MONAI Label's local datastore (a plain folder of NIfTI volumes, labels under
``labels/final``) with checks: ids must be plain names, unknown images give 404, a submitted label
must match its image's shape.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import strtobool

import medunet
from medunet.label.launch import weights_status
from medunet.label.safety import unsafe_id_reason

logger = logging.getLogger(__name__)

__all__ = ["MedunetLabelApp", "MedunetInferTask", "MedunetTrainTask", "MedunetDatastore", "local_bundles"]

UNTRAINED_NOTE = "UNTRAINED (random weights): predictions come from an untrained model"


def _check_id(value: str, what: str = "image") -> None:
    reason = unsafe_id_reason(value) if isinstance(value, str) else f"is a {type(value).__name__}"
    if reason:
        raise HTTPException(status_code=400, detail=f"{what} {value!r} {reason}")


def _nifti_geometry(path: str) -> tuple[tuple[int, ...], np.ndarray] | None:
    """(shape, affine) of a NIfTI file from its header; ``None`` for other formats."""
    if not str(path).endswith((".nii", ".nii.gz")):
        return None
    import nibabel as nib

    try:
        img = nib.load(path)
        return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - any unreadable upload is a client error
        raise HTTPException(status_code=400, detail=f"label file is not a readable NIfTI ({e})") from None


class MedunetDatastore(LocalDatastore):
    """MONAI Label's local datastore with id checks and label-shape validation."""

    def _known(self, image_id: str) -> None:
        _check_id(image_id)
        if not self.get_image_uri(image_id):
            raise HTTPException(status_code=404, detail=f"image {image_id!r} is not in the studies folder")

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        self._known(image_id)
        _check_id(label_tag, "tag")
        label_geo = _nifti_geometry(label_filename)
        image_geo = _nifti_geometry(self.get_image_uri(image_id))
        if label_geo is not None and image_geo is not None:
            (lshape, laff), (ishape, iaff) = label_geo, image_geo
            if lshape[:3] != ishape[:3]:
                raise HTTPException(status_code=400, detail=f"label shape {lshape} does not match image "
                                                            f"{image_id!r} of shape {ishape}")
            if not np.allclose(laff, iaff, atol=1e-3 * float(np.abs(iaff[:3, :3]).max() or 1.0)):
                raise HTTPException(status_code=400, detail=f"label geometry (affine) does not match image "
                                                            f"{image_id!r}: save the label on the image's grid")
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        _check_id(image_id)
        return super().add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id: str) -> None:
        self._known(image_id)
        return super().remove_image(image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        _check_id(label_id, "label")
        _check_id(label_tag, "tag")
        return super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        self._known(image_id)
        return super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        _check_id(label_id, "label")
        _check_id(label_tag, "tag")
        return super().update_label_info(label_id, label_tag, info)


class MedunetInferTask(BundleInferTask):
    """A bundle's model as a MONAI Label segmentation task, predicted by :class:`medunet.inference.Predictor`
    (what ``medunet segment`` and the bundle's ``inferring`` run): the image file is read and
    preprocessed by the Predictor, and the label is written in the file's exact geometry.

    MONAI Label's ``BundleInferTask`` supplies the rest: the network (``network_def`` of
    ``configs/inference.json``) with the weights of ``models/model.pt``, cached per device and reloaded
    when that file changes (fine-tuning), labels from ``metadata.json``. ``info()`` reports the weights'
    origin.
    """

    def pre_transforms(self, data=None):
        return []  # the Predictor reads and preprocesses the image file itself

    def inverse_transforms(self, data=None):
        return None  # the Predictor maps the prediction back onto the input grid

    def post_transforms(self, data=None):
        return []

    def run_inferer(self, data, convert_to_batch=True, device="cuda"):
        from medunet.inference import Predictor, resolve_plan
        from medunet.io import read_image

        network = self._get_network(device, data)
        weights = Path(self.bundle_path) / "models" / "model.pt"
        stamp = weights.stat().st_mtime_ns if weights.exists() else None
        cached = getattr(self, "_plan_cache", None)
        if cached is None or cached[0] != stamp:  # (re)resolved when fine-tuning replaces the weights
            self._plan_cache = cached = (stamp, resolve_plan(self.bundle_path, weights))
        plan = cached[1]
        image = read_image(data["image_path"])
        prediction = Predictor(network, plan, device=device).predict_image(image)
        data[self.output_label_key] = prediction.label
        data["medunet_image"] = image
        return data

    def writer(self, data, extension=None, dtype=None):
        """The label map as NIfTI (uint8 up to 255 classes) with the input's affine and header."""
        from medunet.io import write_like

        if dtype is None:
            dtype = np.uint8 if max(self.labels.values(), default=0) < 256 else np.uint16
        handle, out = tempfile.mkstemp(suffix=".nii.gz")
        os.close(handle)
        write_like(np.asarray(data[self.output_label_key]), data["medunet_image"], out, dtype=dtype)
        return out, {}

    def info(self) -> dict[str, Any]:
        i = super().info()
        status = weights_status(self.bundle_path)
        i["weights"] = status
        if status == "random-init":
            i["description"] = f"{UNTRAINED_NOTE}. {i.get('description') or ''}".strip()
        return i


class MedunetTrainTask(BundleTrainTask):
    """Fine-tune a bundle on the labels submitted to the datastore (``configs/train.json``, run id ``run``).

    Differences from MONAI Label's :class:`BundleTrainTask`: with fewer labelled images than needed for
    a validation split, validation runs on the training images (so a single corrected label can
    already be trained on); the device defaults to CUDA when available, else CPU.
    """

    def config(self) -> dict[str, Any]:
        c = super().config()
        c["multi_gpu"] = False
        return c

    def __call__(self, request, datastore: Datastore):
        self._request = dict(request)
        return super().__call__(request, datastore)

    def _served_plan_file(self) -> str:
        """The plan file of the served ``models/model.pt`` (:func:`medunet.inference.trained_plan_path`:
        ``models/plan.json``, else the bundle's ``configs/plan.json``)."""
        from medunet.inference import trained_plan_path

        bundle = Path(self.bundle_path)
        found = trained_plan_path(bundle / "models" / "model.pt", bundle)
        return str(found if found is not None else bundle / "configs" / "plan.json")

    def _update_overrides(self, overrides):
        """Settings for fine-tuning inside MONAI Label, applied only to keys the bundle defines.

        medunet bundles' train.json trains from scratch on a generated phantom dataset; here the
        data are the submitted labels and training continues from the served weights, so: the plan is
        the served model's plan (never re-planned, no phantom generation), no resume from an older run's
        latest checkpoint, validation (hence best-model saving to ``models/model.pt``) every epoch,
        no progress bars, MLflow only when the request asks for tracking.
        """
        cfg = self.bundle_config
        tracking = str((getattr(self, "_request", None) or {}).get("tracking") or "").lower()
        plan_file = self._served_plan_file()
        if cfg.get("plan_file") is not None and Path(plan_file).exists():
            overrides["plan_file"] = plan_file
            if "@data_root" in str(cfg.get("plan", "")):
                # (no "@ref" here: MONAI parses expressions mentioning "import" as Python before resolving)
                overrides["plan"] = (f"$monai.utils.optional_import('medunet.data', name='Plan')[0]"
                                     f".load({json.dumps(plan_file)})")
        for key, value in (("resume", False), ("val_interval", 1), ("progress_bar", False),
                           ("mlflow", tracking == "mlflow")):
            if cfg.get(key) is not None:
                overrides[key] = value
        if cfg.get("epoch_length") is not None and cfg.get("time_budget", "absent") != "absent":
            # patch-sampling bundles count epochs in steps (250 by default); for fine-tuning on a few
            # submitted labels an epoch is one patch per labelled image, as MONAI Label users expect
            overrides["epoch_length"] = "$max(1, -(-len(@train#dataset.cases) // @batch_size))"
        if cfg.get("time_budget", "absent") != "absent":
            overrides["time_budget"] = None  # the request's max_epochs is the budget
        return overrides

    def _partition_datalist(self, datalist, request, shuffle=False):
        if not datalist:
            raise HTTPException(status_code=400, detail="no labelled images in the studies folder: "
                                                        "submit at least one label before training")
        train, val = super()._partition_datalist(datalist, request, shuffle=shuffle)
        if not train:
            train = list(datalist)
        if val is not None and not val:
            logger.warning("fewer labelled images than a validation split needs: validating on the "
                           f"{len(train)} training image(s)")
            val = list(train)
        return train, val


def local_bundles(app_dir: str, conf: dict[str, str]) -> dict[str, str]:
    """Bundle name → folder under ``<app>/model`` (``--conf models a,b`` or every bundle there).

    Never downloads: a name without a local folder is an error.
    """
    model_dir = Path(app_dir) / "model"
    names = [n.strip() for n in (conf.get("models") or "").split(",") if n.strip()]
    if not names:
        names = sorted(p.name for p in model_dir.glob("*") if (p / "configs" / "inference.json").exists())
    bundles = {}
    for name in names:
        path = model_dir / name
        if not (path / "configs").is_dir():
            raise ValueError(f"{path}: bundle {name!r} not found in the app's model folder "
                             "(medunet label-server copies --bundle folders there)")
        bundles[name] = str(path)
    return bundles


class MedunetLabelApp(MONAILabelApp):
    """MONAI Label app serving medunet bundles (see the module docstring)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        self.models = local_bundles(app_dir, conf)
        for name, path in self.models.items():
            if weights_status(path) == "random-init":
                logger.warning(f"model {name}: {UNTRAINED_NOTE}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"medunet ({medunet.__version__})",
            description="medunet segmentation bundles: " + ", ".join(self.models),
            version=medunet.__version__,
        )

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return MedunetDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name, path in self.models.items():
            task = MedunetInferTask(path, self.conf)
            if not task.is_valid():  # an invalid task would break /info/ for every model
                logger.error(f"model {name}: not served (no configs/inference.json or no models/model.pt)")
                continue
            infers[name] = task
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        trainers: dict[str, TrainTask] = {}
        for name, path in self.models.items():
            task = MedunetTrainTask(path, self.conf)
            if task.is_valid():
                trainers[name] = task
            else:
                logger.warning(f"model {name}: no configs/train.json, so no train task")
        return trainers

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    def _is_server_file(self, image: str) -> bool:
        """An upload or session image the server itself stored (absolute path in its temp/session dir)."""
        if not os.path.isabs(image) or not os.path.exists(image):
            return False
        real = os.path.realpath(image)
        roots = [tempfile.gettempdir(), settings.MONAI_LABEL_SESSION_PATH or ""]
        return any(r and real.startswith(os.path.realpath(r) + os.sep) for r in roots)

    def infer(self, request, datastore=None):
        image = request.get("image")
        if isinstance(image, str) and not self._is_server_file(image):
            _check_id(image)
            if not (datastore or self.datastore()).get_image_uri(image):
                raise HTTPException(status_code=404, detail=f"image {image!r} is not in the studies folder")
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"no model {model!r}; served: {', '.join(self._infers)}")
        return super().infer(request, datastore)
