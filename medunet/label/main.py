"""The MONAI Label app that serves medunet bundles (runs inside the label environment).

``MedunetLabelApp`` is what MONAI Label's ``start_server --app <workdir>/app`` loads (the app folder's
``main.py`` imports it; :mod:`medunet.label.launch` writes that folder). For every bundle copied into
``<app>/model/<name>/`` it registers

* an infer task ``<name>`` (:class:`MedunetInferTask`): the Predictor that ``medunet segment --bundle``
  builds (:meth:`medunet.inference.Predictor.from_bundle` on ``models/model.pt`` and its plan: same
  windows, precision, TTA option and way back to the input grid), so ``/infer`` gives ``medunet
  segment``'s label; request param ``tta`` turns mirroring TTA on. For a study that is a DICOM series,
  ``?output=dicom_seg`` (or param ``output_format: "dicom-seg"``) answers with ``medunet segment
  --format dicom-seg``'s DICOM SEG referencing that series instead of the NIfTI label
  (:mod:`medunet.label.dicom_seg`); asked for another study it gets 400. When training replaces
  ``models/model.pt`` the next request loads it; a file that does not load leaves the last good model
  in service. Its ``/info/`` entry carries ``weights`` (``checkpoint``/``bundle``/``fine-tuned``/
  ``random-init``) and says UNTRAINED when random;
* a train task ``<name>`` (:class:`MedunetTrainTask`, MONAI Label's ``BundleTrainTask``:
  ``configs/train.json`` run with the datastore's labelled images, starting from the served weights,
  writing the model back to ``models/model.pt``); labels that fail :func:`medunet.label.safety.label_problems`
  are left out of training, each named in the log;
* a scoring method and an active-learning strategy ``uncertainty_<name>`` (:class:`UncertaintyScoring`,
  :class:`UncertaintyStrategy`): unlabelled studies ranked by the model's TTA uncertainty
  (:mod:`medunet.label.active`), so *Next Sample* gives the study the model is least sure of.

The datastore is MONAI Label's local datastore (a plain folder of NIfTI volumes and DICOM series
folders, a series being one study named by its folder; labels under ``labels/<tag>``) with checks: ids
must be plain names, unknown images give 404, and a submitted label must be a NIfTI volume on its
image's grid holding only the served models' classes (else 400 with the reason, and nothing is written).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import name_to_device, strtobool

import medunet
from medunet.label import active
from medunet.label.dicom_seg import dicom_series_folder, requested_format, write_dicom_seg_answer
from medunet.label.launch import bundle_labels, weights_status
from medunet.label.safety import label_problems, unsafe_id_reason

logger = logging.getLogger(__name__)

__all__ = ["MedunetLabelApp", "MedunetInferTask", "MedunetTrainTask", "MedunetDatastore", "UncertaintyScoring",
           "UncertaintyStrategy", "local_bundles"]

#: request key: the DICOM series folder a DICOM SEG answer is predicted on (set by the app)
DICOM_SERIES_KEY = "medunet_dicom_series"
UNTRAINED_NOTE = "UNTRAINED (random weights): predictions come from an untrained model"


def _check_id(value: str, what: str = "image") -> None:
    reason = unsafe_id_reason(value) if isinstance(value, str) else f"is a {type(value).__name__}"
    if reason:
        raise HTTPException(status_code=400, detail=f"{what} {value!r} {reason}")


class MedunetDatastore(LocalDatastore):
    """MONAI Label's local datastore with id checks and label checks (:func:`label_problems`).

    ``classes`` (set by the app) are the label values the served models predict; a label holding
    others is refused. A sub-folder of the studies folder that holds a DICOM image series
    (:func:`medunet.io.dicom.files.is_image_series_folder`) is a study too, its id the folder's name
    (listed at start-up and on each datastore reload; MONAI Label's file watcher sees files only).
    """

    classes: set[int] | None = None

    def _images_dir(self) -> str:
        return os.path.realpath(self._datastore.image_path())

    def _list_files(self, path, patterns):
        found = super()._list_files(path, patterns)
        if os.path.realpath(path) != self._images_dir():
            return found
        from medunet.io.dicom.files import is_image_series_folder

        labels_dir = os.path.realpath(self._datastore.label_path(None))
        for name in sorted(os.listdir(path)):
            folder = os.path.join(path, name)
            if (name.startswith(".") or name in found or not os.path.isdir(folder)
                    or os.path.realpath(folder) == labels_dir or unsafe_id_reason(name)):
                continue
            if is_image_series_folder(folder):
                found[name] = name
        return found

    def _to_id(self, file: str):
        if os.path.isdir(os.path.join(self._images_dir(), file)):
            return file, ""  # a series folder: its whole name is the id (UIDs hold dots, not extensions)
        return super()._to_id(file)

    def _known(self, image_id: str) -> None:
        _check_id(image_id)
        if not self.get_image_uri(image_id):
            raise HTTPException(status_code=404, detail=f"image {image_id!r} is not in the studies folder")

    def label_problems(self, image_id: str, label_filename: str, label_name: str | None = None) -> list[str]:
        """Why ``label_filename`` cannot be the label of ``image_id`` (:func:`label_problems`)."""
        return label_problems(label_filename, self.get_image_uri(image_id), self.classes,
                              label_name=label_name)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Store a label after :meth:`label_problems`; a refused one gets 4xx with the reason and
        nothing is written (its temporary upload file is removed)."""
        try:
            self._known(image_id)
            _check_id(label_tag, "tag")
            problems = self.label_problems(image_id, label_filename, label_name=f"for {image_id}")
            if problems:
                raise HTTPException(status_code=400, detail="; ".join(problems))
        except HTTPException:
            if os.path.dirname(os.path.realpath(label_filename)) == os.path.realpath(tempfile.gettempdir()):
                Path(label_filename).unlink(missing_ok=True)  # the endpoint removes it only on success
            raise
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        """Update an image's info from the datastore file as it is now: a scoring run in another
        process must not write back an older copy (dropping labels saved meanwhile)."""
        self._known(image_id)
        self.reload()
        return super().update_image_info(image_id, info)

    def reload(self) -> None:
        """Re-read ``datastore_v2.json`` if another process changed it (MONAI Label's own reader)."""
        self._init_from_datastore_file()

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

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        _check_id(label_id, "label")
        _check_id(label_tag, "tag")
        return super().update_label_info(label_id, label_tag, info)


def _request_flag(value: Any) -> bool:
    """A boolean request parameter sent as JSON ``true``, ``"true"``, ``1``..."""
    return bool(strtobool(str(value))) if isinstance(value, str) else bool(value)


class MedunetInferTask(BundleInferTask):
    """A bundle's model as a MONAI Label segmentation task, predicted by :class:`medunet.inference.Predictor`
    exactly as ``medunet segment --bundle <this bundle copy>`` predicts: the Predictor comes from
    :meth:`~medunet.inference.Predictor.from_bundle` (``models/model.pt`` with its plan, strict weight
    loading, the CLI's defaults for windows, overlap and precision), reads the image file itself and
    writes the label in the file's exact geometry. Request parameter ``tta`` (default false) turns
    mirroring TTA on, as ``medunet segment --tta`` does.

    Predictors are cached per (device, TTA, uncertainty) and rebuilt when ``models/model.pt`` changes
    (fine-tuning); a replacement that cannot be loaded leaves the previous, last good model in
    service (and is tried again on the next request). MONAI Label's ``BundleInferTask`` supplies the
    rest: validity, labels from ``metadata.json``, ``info()`` (plus the weights' origin).
    """

    def __init__(self, path: str, conf: dict[str, str], **kwargs):
        super().__init__(path, conf, **kwargs)
        self._predictors: dict[tuple, tuple[list[int] | None, Any]] = {}
        self._predictors_lock = threading.Lock()

    @property
    def weights_file(self) -> Path:
        return Path(self.bundle_path) / "models" / "model.pt"

    def predictor(self, device: str, tta: bool = False, uncertainty: str | None = None):
        """The Predictor of the served weights (see the class docstring)."""
        from medunet.inference import Predictor

        key = (str(device), bool(tta), uncertainty)
        stamp = active.file_stamp(self.weights_file)
        with self._predictors_lock:
            cached = self._predictors.get(key)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            try:
                predictor = Predictor.from_bundle(self.bundle_path, device=device, tta=tta, uncertainty=uncertainty)
            except Exception as e:  # noqa: BLE001 - a half-written or broken file must not end the service
                reason = " ".join(str(e).split())[:300] or type(e).__name__
                if cached is not None:
                    logger.warning(f"{self.weights_file}: cannot load the new weights ({reason}); "
                                   "serving the last good model")
                    return cached[1]
                raise HTTPException(status_code=503, detail=f"model weights cannot be loaded: {reason}") from None
            self._predictors[key] = (stamp, predictor)
            return predictor

    def clear_cache(self):
        super().clear_cache()
        with self._predictors_lock:
            self._predictors.clear()

    def pre_transforms(self, data=None):
        return []  # the Predictor reads and preprocesses the image file itself

    def inverse_transforms(self, data=None):
        return None  # the Predictor maps the prediction back onto the input grid

    def post_transforms(self, data=None):
        return []

    def _read(self, path: str):
        from medunet.io import InputError, read_image

        try:
            return read_image(path)
        except InputError as e:
            raise HTTPException(status_code=400, detail=f"image cannot be read: {e.reason}") from None

    def run_inferer(self, data, convert_to_batch=True, device="cuda"):
        from medunet.io import InputError

        predictor = self.predictor(device, tta=_request_flag(data.get("tta", False)))
        # a DICOM SEG answer is predicted on the series itself (a DICOMweb study's image is a NIfTI copy)
        image = self._read(data.get(DICOM_SERIES_KEY) or data["image_path"])
        try:
            prediction = predictor.predict_image(image, probabilities=False)
        except InputError as e:
            raise HTTPException(status_code=400, detail=f"image cannot be segmented by this model: {e.reason}") from None
        data[self.output_label_key] = prediction.label
        data["medunet_image"] = image
        data["medunet_labels"] = predictor.plan.labels
        return data

    def study_uncertainty(self, image_path: str, device: str, kind: str = "entropy") -> float:
        """:func:`medunet.label.active.study_uncertainty` of one image file, predicted with mirroring TTA
        (a plan without mirror axes predicts once) and per-voxel uncertainty ``kind``."""
        from medunet.io import read_image

        image = read_image(image_path)
        prediction = self.predictor(device, tta=True, uncertainty=kind).predict_image(image)
        return active.study_uncertainty(prediction.uncertainty, image)

    def writer(self, data, extension=None, dtype=None):
        """The label map as NIfTI (uint8 up to 255 classes) with the input's affine and header, or, when
        the request asks for ``dicom-seg``, as the DICOM SEG of the series it was predicted on
        (:func:`medunet.label.dicom_seg.write_dicom_seg_answer`)."""
        from medunet.io import InputError, write_like

        if requested_format(data) == "dicom-seg":
            image = data["medunet_image"]
            try:
                return write_dicom_seg_answer(np.asarray(data[self.output_label_key]), image, data["medunet_labels"],
                                              name=Path(image.path).name)
            except InputError as e:
                raise HTTPException(status_code=400,
                                    detail=f"no DICOM SEG for {Path(image.path).name!r}: {e.reason}") from None
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


class UncertaintyScoring(ScoringMethod):
    """Score every unlabelled study by the model's uncertainty (``/scoring/uncertainty_<model>``).

    For each study without a current score (:func:`medunet.label.active.is_current`: same model file,
    same image file) the infer task predicts it with TTA and stores
    :func:`medunet.label.active.score_record` under ``medunet_uncertainty_<model>`` in the datastore's
    image info, where :class:`UncertaintyStrategy` reads it. A study that cannot be read is recorded
    with its reason and ranked last. MONAI Label runs this in a background process at start-up, after
    training and after *Next Sample* (the app skips it when every score is current).

    Args:
        model: the model's name.
        task: its infer task.
        kind: per-voxel uncertainty, ``"entropy"`` (of the TTA mean; needs no mirror axes) or
            ``"variance"`` (of the TTA copies: zero for a plan that does not mirror).
    """

    def __init__(self, model: str, task: MedunetInferTask, kind: str = "entropy"):
        from medunet.inference.tta import UNCERTAINTY_KINDS

        if kind not in UNCERTAINTY_KINDS:
            raise ValueError(f"--conf uncertainty {kind!r}: use one of {', '.join(UNCERTAINTY_KINDS)}")
        super().__init__(f"Rank unlabelled studies by the {kind} of {model}'s TTA prediction (most uncertain first)")
        self.model, self.task, self.kind = model, task, kind
        self.key = f"{active.SCORE_KEY}_{model}"

    def stale(self, datastore: Datastore) -> list[str]:
        """Unlabelled studies without a current score."""
        weights = active.file_stamp(self.task.weights_file)
        out = []
        for image_id in datastore.get_unlabeled_images():
            record = datastore.get_image_info(image_id).get(self.key)
            if not active.is_current(record, weights, active.file_stamp(datastore.get_image_uri(image_id))):
                out.append(image_id)
        return out

    def __call__(self, request, datastore: Datastore):
        device = name_to_device(request.get("device", "cuda"))
        weights = active.file_stamp(self.task.weights_file)
        todo = self.stale(datastore)
        t0 = time.monotonic()
        failed = {}
        for image_id in todo:
            uri = datastore.get_image_uri(image_id)
            start = time.monotonic()
            try:
                score = self.task.study_uncertainty(uri, device, self.kind)
            except Exception as e:  # noqa: BLE001 - one bad study must not stop the others
                failed[image_id] = " ".join(str(e).split())[:300] or type(e).__name__
                logger.warning(f"{self.key}: {image_id}: not scored ({failed[image_id]})")
                datastore.update_image_info(image_id, {self.key: {"error": failed[image_id], "weights": weights,
                                                                  "image": active.file_stamp(uri)}})
                continue
            record = active.score_record(score, self.kind, weights, active.file_stamp(uri), time.monotonic() - start)
            datastore.update_image_info(image_id, {self.key: record})
            logger.info(f"{self.key}: {image_id}: {record['score']:.4f} ({record['seconds']:.1f} s)")
        summary = {"model": self.model, "kind": self.kind, "scored": len(todo) - len(failed), "failed": failed,
                   "seconds": round(time.monotonic() - t0, 3)}
        logger.info(f"{self.key}: {summary}")
        return summary


class UncertaintyStrategy(Strategy):
    """*Next Sample* = the unlabelled study the model is least sure of (``/activelearning/uncertainty_<model>``).

    Studies are ordered by :func:`medunet.label.active.rank_studies` from the scores
    :class:`UncertaintyScoring` stored; one handed out in the last ``reset_s`` seconds goes after the
    others, so two annotators (or two clicks) get different studies.
    """

    def __init__(self, model: str, scoring: UncertaintyScoring, reset_s: float = 24 * 3600):
        super().__init__(f"Unlabelled study that {model} is least sure of (uncertainty_{model} scores)")
        self.model, self.scoring, self.reset_s = model, scoring, float(reset_s)

    def __call__(self, request, datastore: Datastore):
        if hasattr(datastore, "reload"):
            datastore.reload()  # scores are written by the scoring process
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        strategy = request.get("strategy", f"uncertainty_{self.model}")
        infos = {i: datastore.get_image_info(i) for i in images}
        records = {i: info.get(self.scoring.key) for i, info in infos.items()}
        served = {i: info.get("strategy", {}).get(strategy, {}).get("ts", 0) for i, info in infos.items()}
        stamps = {i: active.file_stamp(datastore.get_image_uri(i)) for i in images}
        ranked = active.rank_studies(records, active.file_stamp(self.scoring.task.weights_file), stamps,
                                     served=served, reset_s=self.reset_s)
        chosen = ranked[0]
        record = records.get(chosen) or {}
        logger.info(f"{strategy}: ranking {[(i, (records.get(i) or {}).get('score')) for i in ranked[:10]]}")
        return {"id": chosen, "uncertainty": record.get("score"), "uncertainty_kind": record.get("kind"),
                "ranking": ranked[:20]}


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

    def _fetch_datalist(self, request, datastore: Datastore):
        """The datastore's labelled images, without those whose label fails
        :func:`medunet.label.safety.label_problems` for this model's classes (each logged with its
        reason): a label put into ``labels/final`` by hand, or by an older server, is never trained on."""
        datalist = super()._fetch_datalist(request, datastore)
        classes = set(bundle_labels(Path(self.bundle_path)).values())
        good = []
        for item in datalist:
            label = item.get("label")
            if not isinstance(label, str):  # not a label volume (MONAI Label's detection boxes): as is
                good.append(item)
                continue
            problems = label_problems(label, item["image"], classes)
            if problems:
                logger.warning(f"training leaves out {os.path.basename(label)}: {'; '.join(problems)}")
            else:
                good.append(item)
        if datalist and not good:
            raise HTTPException(status_code=400, detail=f"none of the {len(datalist)} labelled image(s) has a "
                                                        "usable label (see the train log for each reason)")
        return good

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
        datastore = MedunetDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )
        # a submitted label may hold the classes of any served model (0 = background)
        datastore.classes = {0}.union(*(bundle_labels(Path(p)).values() for p in self.models.values()))
        return datastore

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

    def _uncertainty_scorings(self) -> dict[str, UncertaintyScoring]:
        """``uncertainty_<model>`` scoring per served model (``--conf uncertainty_models a,b`` limits
        them; ``--conf uncertainty entropy|variance`` sets the per-voxel measure)."""
        if getattr(self, "_uncertainty", None) is None:
            names = [n.strip() for n in (self.conf.get("uncertainty_models") or "").split(",") if n.strip()]
            kind = self.conf.get("uncertainty", "entropy")
            self._uncertainty = {f"uncertainty_{name}": UncertaintyScoring(name, task, kind)
                                 for name, task in self._infers.items() if not names or name in names}
        return self._uncertainty

    def init_strategies(self) -> dict[str, Strategy]:
        reset_s = float(self.conf.get("uncertainty_reset_s", 24 * 3600))
        strategies: dict[str, Strategy] = {"random": Random(), "first": First()}
        for method, scoring in self._uncertainty_scorings().items():
            strategies[method] = UncertaintyStrategy(scoring.model, scoring, reset_s=reset_s)
        return strategies

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        return dict(self._uncertainty_scorings())

    def async_scoring(self, method, params=None):
        """MONAI Label's background scoring, started only for methods with unscored studies (it runs
        after every *Next Sample*; a run with nothing to do would still cost a process start)."""
        if method:
            return super().async_scoring(method, params)
        if hasattr(self.datastore(), "reload"):
            self.datastore().reload()  # scores written by the last scoring process
        result = {}
        for name, scoring in self._scoring_methods.items():
            if isinstance(scoring, UncertaintyScoring) and not scoring.stale(self.datastore()):
                continue
            result[name] = super().async_scoring(name, params)
        return result

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
        try:
            wanted = requested_format(request)
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        # the series folder is the server's to set, from the checked study id: never a path from the client
        request = {k: v for k, v in request.items() if k != DICOM_SERIES_KEY}
        if wanted == "dicom-seg":
            request[DICOM_SERIES_KEY] = str(self._dicom_series(image, datastore or self.datastore()))
        return super().infer(request, datastore)

    def _dicom_series(self, image: Any, datastore: Datastore) -> Path:
        """The DICOM series folder of the requested study (:func:`medunet.label.dicom_seg.dicom_series_folder`),
        or 400 naming the study and what it is instead."""
        if not isinstance(image, str):
            raise HTTPException(status_code=400, detail="DICOM SEG needs a study that is a DICOM series; "
                                                        "this request holds no study id")
        if self._is_server_file(image):  # an uploaded file or a session's image: never a series folder
            series, what = dicom_series_folder(image), f"the uploaded image {os.path.basename(image)!r}"
        else:
            uri = datastore.get_image_uri(image)
            images_dir = datastore._datastore.image_path() if isinstance(datastore, LocalDatastore) else None
            series, what = dicom_series_folder(uri, images_dir, image), f"image {image!r}"
            if series is None:
                what += f" (file {os.path.basename(uri)})"
        if series is None:
            raise HTTPException(status_code=400, detail=f"{what} is not a DICOM series, so it has no DICOM SEG: "
                                                        "ask for a NIfTI label (output=image, no output_format) "
                                                        "or use a study that is a DICOM series folder")
        return series
