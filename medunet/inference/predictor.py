"""Segment images with a trained network: exactly training's preprocessing, tiled inference, optional
mirroring TTA and uncertainty, and the result mapped back onto the input's exact voxel grid.

Pipeline for one image (``Predictor.predict_image``):

1. channels first ``(C, *S)``;
2. :func:`medunet.data.preprocess.preprocess_tensor` (training's preprocessing, on the compute device):
   crop to the nonzero region, reorient to ``plan.orientation``, resample to ``plan.target_spacing``
   (MONAI's ``Orientation`` + ``Spacing``), ``normalize_intensity(x, plan.normalization)``;
4. tiled inference (:class:`~medunet.inference.sliding.TiledInferer`; on the CPU, large images on
   OpenVINO when it is installed: ``backend="auto"``), softmax, optional TTA;
5. probabilities resampled linearly back to the input grid, then argmax → uint8 label;
6. optional largest-connected-component cleaning per class.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medunet.data.grid import PlanGrid
from medunet.data.plan import Plan, normalize_intensity
from medunet.data.preprocess import channels_first, nonzero_box, nonzero_box_affine, preprocess_tensor
from medunet.inference.bundle import resolve_plan
from medunet.inference.export import load_engine
from medunet.inference.postprocess import keep_largest_component
from medunet.inference.sliding import build_inferer
from medunet.inference.tta import UNCERTAINTY_KINDS, entropy_map, mirror_combinations, predict_probabilities
from medunet.io import (
    ImageData,
    InputError,
    image_id,
    is_2d_image,
    is_dicom_file,
    is_nifti,
    load_weights,
    read_image,
    write_like,
    write_maps_like,
)
from medunet.io.errors import os_error_words, printable
from medunet.io.writable import output_file_problem, output_folder_problem

# backend="auto": an image whose windows hold this many voxels in all goes to OpenVINO (converting
# the network takes a few seconds; at about 1 µs per window voxel on torch, OpenVINO saves about half)
AUTO_OPENVINO_VOXELS = 8_000_000

__all__ = [
    "AUTO_OPENVINO_VOXELS", "Predictor", "Prediction", "SegmentResult", "collect_inputs", "scan_inputs", "scan_input_folders", "resolve_plan", "summary_table",
    "resolve_device", "output_paths", "nonzero_box", "nonzero_box_affine", "body_box",
]


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX-512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None → CUDA when available, else CPU; anything else as given (checked)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available (use --device cpu or auto)")
    return dev


@dataclass
class Prediction:
    """A prediction in the input image's exact geometry.

    Attributes:
        label: uint8 label map, shape ``image.spatial_shape``.
        image: the input (its affine/header are the output's geometry).
        probabilities: float32 ``(K, *spatial_shape)`` softmax probabilities, or None.
        uncertainty: float32 ``spatial_shape`` map in [0, 1] (normalised entropy or TTA variance), or None.
        seconds: wall time of the prediction.
        stats: tiling details (windows computed/reused, tile sizes, plan-space shape).
    """

    label: np.ndarray
    image: ImageData
    probabilities: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)


@dataclass
class SegmentResult:
    """Outcome of one input of :meth:`Predictor.segment`."""

    input: str
    status: str  # "ok", "failed", "skipped" (all outputs exist) or "ignored" (hidden, repeated, in the output folder)
    outputs: list[str] = field(default_factory=list)
    shape: tuple[int, ...] | None = None
    seconds: float = 0.0
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def failed(self) -> bool:
        """A failure (a skipped case whose outputs all exist already is not one)."""
        return self.status == "failed"

    @property
    def done(self) -> bool:
        """Its outputs exist: segmented now, or skipped because they existed already."""
        return self.status in ("ok", "skipped")


class Predictor:
    """Segment images with a network and the plan it was trained with.

    Args:
        network: a medunet network (weights loaded), ``(B, C, *S) -> (B, K, *S')``.
        plan: the :class:`~medunet.data.Plan` used for training (orientation, spacing, normalisation).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:i]"``.
        tta: average over all mirrored copies (8 in 3D, 4 in 2D), as nnU-Net does.
        roi_size: input window (voxels), ``None`` for the plan's patch, or ``"auto"`` (default): the
            patch scaled up to ~1M voxels, or the patch itself for instance/group-norm networks (see
            :class:`~medunet.inference.sliding.TiledInferer`).
        overlap: window overlap for 'same' networks (MONAI's bundles use 0.5; 0.25 needs about half
            the windows; windows are spread evenly, so the real overlap is often larger).
        mode: window blending, ``"gaussian"`` or ``"constant"``.
        sw_batch_size: windows per network call.
        largest_component: keep only the largest connected component of a class: ``None`` (default)
            for the classes the plan lists (``plan.largest_component``, chosen by the planner from the
            training labels), True for every class, False for none.
        uncertainty: ``None``, ``"entropy"`` (normalised entropy of the mean probabilities) or
            ``"variance"`` (TTA variance; needs ``tta``).
        progress: tqdm bars over files and windows.
        channels_last: run 3D windows in ``channels_last_3d`` memory format.
        cpu_bf16: bfloat16 autocast on the CPU; ``"auto"`` (default): when the CPU has native bf16
            (AVX-512-BF16/AMX), where it is ~1.8× faster. On CUDA, float16 AMP is always on.
        body_crop: CT only: predict inside the bounding box of the body (HU > ``body_hu`` on a 4×
            coarser grid, widened by ``body_margin`` plan voxels) and background outside it; False
            (default) predicts everywhere. See :func:`body_box`.
        body_hu, body_margin: threshold (HU) and margin (plan voxels per side) of ``body_crop``.
        roi_first: ROI-first inference, as TotalSegmentator crops: another Predictor (a cheap
            low-resolution model of the same classes, e.g. the ``ct`` bundle's 3 mm plan) segments the
            image first; this Predictor then runs only inside the bounding box of what it found
            (every foreground class together), widened by ``roi_margin_mm``, and background outside.
            When the first pass finds nothing the whole image is predicted. None (default): off.
        roi_margin_mm: margin (mm per side, in plan space) around the first pass's box.
        placement: where sliding windows go, ``"even"`` (default) or ``"monai"`` (MONAI's rule: with
            MONAI's roi, overlap and float32 the probabilities equal ``sliding_window_inference``'s);
            see :class:`~medunet.inference.sliding.TiledInferer`.
        backend: what runs the network's windows: ``"auto"`` (default), ``"torch"``, ``"torch-compile"``
            (``torch.compile``: compiled at the first window, so it pays off over a folder), ``"onnxruntime"``
            or ``"openvino"`` (CPU only; the network converted at start-up, or ``model_file``; OpenVINO
            computes in bfloat16 when ``cpu_bf16`` is on). See :mod:`medunet.inference.export`.
            ``"auto"``: on the CPU with OpenVINO installed, an image whose windows hold at least
            :data:`AUTO_OPENVINO_VOXELS` voxels in all runs on OpenVINO (about twice torch's speed on a
            CT-sized volume; the network is converted at the first such image and the converted file
            kept in the cache folder, :func:`~medunet.inference.export.model_cache_dir`), anything
            smaller on torch (where converting would cost more than it saves). The choice depends on
            the image alone, so one image gets the same labels in a folder and on its own.
        model_file: an exported ``.onnx`` / OpenVINO ``.xml`` file of the same weights for ``backend``.

    Example:
        >>> predictor = Predictor.from_bundle("bundles/ct")
        >>> pred = predictor.predict_file("case_001.nii.gz")
        >>> pred.label.shape == pred.image.spatial_shape
        True
    """

    def __init__(
        self,
        network: torch.nn.Module,
        plan: Plan,
        device: str | torch.device = "auto",
        tta: bool = False,
        roi_size: Sequence[int] | int | str | None = "auto",
        overlap: float = 0.25,
        mode: str = "gaussian",
        sw_batch_size: int = 1,
        largest_component: bool | None = None,
        uncertainty: str | None = None,
        progress: bool = False,
        channels_last: bool = False,
        cpu_bf16: bool | str = "auto",
        body_crop: bool = False,
        body_hu: float = -500.0,
        body_margin: int = 16,
        roi_first: Predictor | None = None,
        roi_margin_mm: float = 10.0,
        placement: str = "even",
        backend: str = "auto",
        model_file: str | os.PathLike | None = None,
    ) -> None:
        if uncertainty is not None and uncertainty not in UNCERTAINTY_KINDS:
            raise ValueError(f"uncertainty must be None or one of {UNCERTAINTY_KINDS}, got {uncertainty!r}")
        if uncertainty == "variance" and not tta:
            raise ValueError("uncertainty='variance' is the spread over TTA copies: it needs tta=True")
        self.plan = plan
        self.device = resolve_device(device)
        self.network = network.to(self.device).eval()
        self.tta = tta
        if largest_component is None:
            self.largest_component = [int(c) for c in (plan.largest_component or [])]
        else:
            self.largest_component = list(range(1, plan.out_channels)) if largest_component else []
        self.uncertainty = uncertainty
        self.progress = progress
        self.body_crop = bool(body_crop) and plan.normalization.get("scheme") == "ct"
        self.body_hu = float(body_hu)
        self.body_margin = int(body_margin)
        if roi_first is not None and roi_first.plan.out_channels != plan.out_channels:
            raise ValueError(f"the ROI-first model predicts {roi_first.plan.out_channels} classes, this one "
                             f"{plan.out_channels}: they must segment the same classes")
        self.roi_first = roi_first
        self.roi_margin_mm = float(roi_margin_mm)
        if cpu_bf16 == "auto":
            cpu_bf16 = cpu_has_native_bf16()
        self.inferer = build_inferer(self.network, plan, roi_size=roi_size, overlap=overlap, mode=mode,
                                     sw_batch_size=sw_batch_size, device=self.device, progress=progress,
                                     channels_last=channels_last, cpu_bf16=cpu_bf16, placement=placement)
        if backend not in ("auto", "torch", "torch-compile") and self.device.type != "cpu":
            raise ValueError(f"backend {backend!r} runs on the CPU only (device {self.device}): use --device cpu")
        if backend == "auto" and model_file is not None:
            raise ValueError("a model file is for --backend onnxruntime or openvino")
        self.backend = backend
        self.cpu_bf16 = bool(cpu_bf16)
        # what the inferer calls for each batch of windows: the eager network or an exported engine
        # ("auto": torch until an image is large enough for OpenVINO, see _engine_for)
        self.engine = load_engine("torch" if backend == "auto" else backend, self.network, plan.patch_size,
                                  plan.in_channels, model_file, bf16=self.cpu_bf16)
        self._auto_openvino = None
        self._auto_possible = (backend == "auto" and self.device.type == "cpu"
                               and importlib.util.find_spec("openvino") is not None)
        self._active = self.engine

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, bundle_dir: str | os.PathLike | None, checkpoint: str | os.PathLike | None = None,
                    device: str | torch.device = "auto", **kwargs) -> Predictor:
        """Network, plan and weights from a bundle folder and/or a checkpoint.

        The checkpoint defaults to ``<bundle>/models/model.pt``. The plan is
        :func:`medunet.inference.bundle.resolve_plan`'s: the checkpoint's ``"plan"`` entry, else
        ``plan.json`` beside the checkpoint, else the bundle's. Without any checkpoint a warning says
        the network is untrained.
        """
        bundle = Path(bundle_dir) if bundle_dir is not None else None
        if bundle is not None and not bundle.is_dir():
            raise InputError(bundle, "bundle folder not found")
        ckpt = Path(checkpoint) if checkpoint is not None else None
        if ckpt is None and bundle is not None and (bundle / "models" / "model.pt").is_file():
            ckpt = bundle / "models" / "model.pt"
        if ckpt is None and bundle is None:
            raise ValueError("give a bundle folder or a checkpoint")
        if ckpt is not None and not ckpt.exists():
            raise InputError(ckpt, "checkpoint not found")
        plan = resolve_plan(bundle, ckpt)
        network = plan.build_network()
        if ckpt is not None:
            load_weights(network, ckpt)
        else:
            warnings.warn(
                f"{bundle}: no checkpoint (models/model.pt missing and none given): predictions come from an "
                "UNTRAINED network", UserWarning, stacklevel=2,
            )
        return cls(network, plan, device=device, **kwargs)

    # -- one image ---------------------------------------------------------------------------------
    def predict_file(self, path: str | os.PathLike) -> Prediction:
        """Read (NIfTI, DICOM series folder, PNG/TIFF) and predict."""
        return self.predict_image(read_image(path))

    def predict_image(self, image: ImageData, probabilities: bool = True, release_input: bool = False) -> Prediction:
        """Predict one image; the label has the image's exact spatial shape and geometry.

        ``probabilities=False``: the label only (``Prediction.probabilities`` None, unless an
        uncertainty map is asked for, which needs them): the way back to the input grid then resamples
        and takes the argmax a few planes at a time, so the ``K`` float32 maps of the input's size never
        exist — for a large CT the difference between about one input's size of memory and ``2K`` of
        them. The label is the same either way.

        ``release_input=True`` (``segment`` writes only the label and geometry afterwards): the voxels
        are let go once they are in plan space — ``image.array`` becomes a zero-memory stand-in of the
        same shape and dtype — so the network runs without the input's size of memory held.
        """
        start = time.perf_counter()
        x = self._to_channels_first(image)
        low, high = channel_range(x)  # read now: with release_input the voxels are gone at a NaN
        with torch.inference_mode():
            if bool((low == high).all()):  # one value everywhere (an empty or padding-only scan): nothing to segment
                probs, unc = self._blank_prediction(x, probabilities)
                label = torch.zeros(x.shape[1:], dtype=torch.uint8)
            else:
                if release_input:
                    image.array = np.broadcast_to(np.zeros((), dtype=image.array.dtype), image.array.shape)
                held = [x]  # _predict_array takes it out, so that it can drop the voxels when done with them
                del x
                try:
                    probs, unc, label = self._predict_array(held, image.affine, probabilities)
                except _NotFinite:
                    raise InputError(image.path, f"the network's output is not a number (NaN/Inf) for this image "
                                                 f"(intensities {float(low.min()):.4g} to {float(high.max()):.4g})"
                                     ) from None
            label = label.cpu().numpy()
        if self.largest_component:
            label = keep_largest_component(label, self.largest_component)
        out_shape = image.spatial_shape
        return Prediction(
            label=label.reshape(out_shape), image=image,
            probabilities=probs.cpu().numpy().reshape((probs.shape[0], *out_shape)) if probs is not None else None,
            uncertainty=unc.cpu().numpy().reshape(out_shape) if unc is not None else None,
            seconds=time.perf_counter() - start, stats=dict(getattr(self.inferer, "last_stats", {})),
        )

    def _to_channels_first(self, image: ImageData) -> torch.Tensor:
        """``(C, *S)`` float32 tensor of an image, checked against the model's channels and dimensions."""
        x = channels_first(image)
        if x.shape[0] != self.plan.in_channels:
            raise InputError(image.path, f"has {x.shape[0]} channel(s) but the model expects {self.plan.in_channels}")
        if image.spatial_dims == 2 and self.plan.spatial_dims == 3:
            raise InputError(image.path, f"is a 2D image {image.spatial_shape} but the model is 3D")
        return x

    def _blank_prediction(self, x: torch.Tensor, probabilities: bool = True,
                          ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Background with certainty (uncertainty 0) for an image without any contrast: probabilities
        ``(K, *S)`` (None when not asked for and no uncertainty is) and uncertainty ``(*S)``/None."""
        probs = None
        if probabilities or self.uncertainty:
            probs = torch.zeros((self.plan.out_channels, *x.shape[1:]), dtype=torch.float32)
            probs[0] = 1.0
        if not isinstance(getattr(self.inferer, "last_stats", None), dict):
            self.inferer.last_stats = {}
        self.inferer.last_stats.clear()
        self.inferer.last_stats.update(blank=True, windows=0)
        return probs, (torch.zeros(x.shape[1:], dtype=torch.float32) if self.uncertainty else None)

    def _predict_array(self, x: torch.Tensor | list[torch.Tensor], affine: np.ndarray, probabilities: bool = True,
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """``(C, *S)`` → probabilities ``(K, *S)`` (None when not asked for and no uncertainty is),
        uncertainty ``(*S)``/None and the uint8 label ``(*S)``, in the input grid.

        ``x`` in a one-element list: taken out of it, and dropped once in plan space (the caller holds
        no other reference when it wants the memory back).

        Preprocessing is training's (``medunet.data.transforms``): crop to the nonzero region, reorient,
        resample, normalise. Outside the cropped region the prediction is background with certainty.
        Raises ``_NotFinite`` when the network's output holds NaN/Inf.
        """
        x = x.pop() if isinstance(x, list) else x
        x = x.to(self.device)
        d = x.dim() - 1
        t0 = time.perf_counter()
        xp, grid, box = self.preprocess(x, affine, normalize=False)
        body = body_box(xp, self.body_hu, self.body_margin) if self.body_crop else None
        roi_s = None
        if self.roi_first is not None:
            t_roi = time.perf_counter()
            roi = self._first_pass_box(x, affine, grid, box)
            roi_s = time.perf_counter() - t_roi
            if roi is not None:
                body = roi if body is None else _intersect(body, roi)
        in_shape = tuple(x.shape[1:])
        del x  # everything below works in plan space, then writes into new input-sized arrays
        xp = normalize_intensity(xp, self.plan.normalization)
        t1 = time.perf_counter()
        slicewise = self.plan.spatial_dims == 2 and d == 3
        self._active = self._engine_for(tuple(xp.shape[1:]) if body is None else
                                        tuple(b.stop - b.start for b in body), slicewise)
        probs, variance = predict_probabilities(
            self._slicewise_logits if slicewise else self._logits,
            (xp if body is None else xp[(slice(None), *body)]).unsqueeze(0), tta=self.tta,
            mirror_axes=(0, 1) if slicewise else self.plan.mirror_axes, with_variance=self.uncertainty == "variance",
        )
        t2 = time.perf_counter()
        if not bool(torch.isfinite(probs).all()):
            raise _NotFinite
        k = probs.shape[1]
        stack = probs[0] if variance is None else torch.cat([probs[0], variance], dim=0)
        if body is not None:  # background with certainty outside the body box
            inner = stack
            stack = torch.zeros((inner.shape[0], *xp.shape[1:]), dtype=inner.dtype, device=inner.device)
            stack[0] = 1.0
            stack[(slice(None), *body)] = inner
        unc = None
        if probabilities or self.uncertainty is not None:
            back = grid.from_plan(stack, "bilinear")
            full = torch.zeros((back.shape[0], *in_shape), dtype=back.dtype, device=back.device)
            full[0] = 1.0  # background outside the cropped region
            full[(slice(None), *box)] = back
            probs = full[:k]
            if self.uncertainty == "entropy":
                unc = entropy_map(probs, dim=0)
            elif self.uncertainty == "variance":
                unc = full[k]
            label = _argmax_label(probs)
        else:  # the label alone: resampled and decided a few planes at a time
            label = torch.zeros(in_shape, dtype=torch.uint8, device=stack.device)  # background outside the crop
            label[box] = grid.from_plan(stack, "bilinear", reduce=_argmax_label)
            probs = None
        if not isinstance(getattr(self.inferer, "last_stats", None), dict):
            self.inferer.last_stats = {}
        self.inferer.last_stats.update(backend=getattr(self._active, "name", "torch"),
                                       plan_shape=grid.plan_shape, preprocess_s=t1 - t0, network_s=t2 - t1,
                                       restore_s=time.perf_counter() - t2,
                                       body_box=None if body is None else tuple((b.start, b.stop) for b in body),
                                       roi_first_s=roi_s)
        return probs, unc, label

    def _first_pass_box(self, x: torch.Tensor, affine: np.ndarray, grid: PlanGrid,
                        box: tuple[slice, ...]) -> tuple[slice, ...] | None:
        """The ROI-first model's foreground bounding box, as a box of this plan's grid widened by
        ``roi_margin_mm`` (None when it finds no foreground: predict everywhere).

        ``x`` (C, *S) and ``affine``: the input; ``grid``/``box``: this Predictor's plan grid of the
        input's nonzero crop ``box``."""
        _, _, label = self.roi_first._predict_array(x, affine, probabilities=False)
        mask = label[None] != 0
        if not bool(mask.any()):
            return None
        found = nonzero_box(mask)
        d = label.dim()
        # corners of the found box (voxel edges) in the cropped input's voxels -> this plan's voxels
        lo = np.array([f.start - b.start for f, b in zip(found, box)], dtype=np.float64) - 0.5
        hi = np.array([f.stop - b.start for f, b in zip(found, box)], dtype=np.float64) - 0.5
        corners = np.array(np.meshgrid(*[[a, b] for a, b in zip(lo, hi)], indexing="ij")).reshape(d, -1)
        to_plan = np.linalg.solve(grid.plan_affine, grid.image_affine)
        mapped = to_plan[:d, :d] @ corners + to_plan[:d, d:]
        margin = [self.roi_margin_mm / s for s in grid.plan_spacing]
        return tuple(slice(max(0, int(np.floor(mapped[a].min() + 0.5 - m))),
                           min(n, int(np.ceil(mapped[a].max() + 0.5 + m))))
                     for a, (m, n) in enumerate(zip(margin, grid.plan_shape)))

    def preprocess(self, x: torch.Tensor, affine: np.ndarray,
                   normalize: bool = True) -> tuple[torch.Tensor, PlanGrid, tuple[slice, ...]]:
        """:func:`medunet.data.preprocess.preprocess_tensor` of ``x`` (C, *S) with its 4×4 ``affine``.

        Returns ``(image in plan space (C, *plan_shape), its PlanGrid, the nonzero crop box in x)``;
        the image equals what ``medunet.data.transforms.val_transforms(plan)`` yields for the same file
        (``normalize=False``: before intensity normalisation, e.g. in HU).
        """
        return preprocess_tensor(x, affine, self.plan, normalize=normalize)

    def _engine_for(self, shape: tuple[int, ...], slicewise: bool = False):
        """What runs the windows of an image whose plan-space shape is ``shape``: ``self.engine``, or for
        ``backend="auto"`` OpenVINO when the image's windows (times the TTA copies) hold at least
        :data:`AUTO_OPENVINO_VOXELS` voxels. A network OpenVINO cannot convert stays on torch, with one
        warning."""
        if not self._auto_possible or slicewise or not hasattr(self.inferer, "layout"):
            return self.engine
        lay = self.inferer.layout(self.network, shape)
        work = int(np.prod(lay["tile_in"])) * int(np.prod([len(s) for s in lay["starts"]]))
        if self.tta:
            work *= len(mirror_combinations(len(shape), self.plan.mirror_axes))
        if work < AUTO_OPENVINO_VOXELS:
            return self.engine
        if self._auto_openvino is None:
            try:
                self._auto_openvino = load_engine("openvino", self.network, self.plan.patch_size,
                                                  self.plan.in_channels, bf16=self.cpu_bf16)
            except Exception as error:  # noqa: BLE001 - any converter failure: torch does the work
                self._auto_possible = False
                warnings.warn(f"backend auto: OpenVINO could not convert this network ({_one_line(error)}); "
                              "running it on torch", RuntimeWarning, stacklevel=2)
                return self.engine
        return self._auto_openvino

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.inferer(x, self._active)

    def _slicewise_logits(self, x: torch.Tensor) -> torch.Tensor:
        """A 2D network over a volume ``(B, C, X, Y, Z)``, one axial slice at a time."""
        return torch.stack([self.inferer(x[..., z], self._active) for z in range(x.shape[-1])], dim=-1)

    # -- batches -------------------------------------------------------------------------------------
    def segment(
        self,
        inputs: str | os.PathLike | Iterable[str | os.PathLike],
        out_dir: str | os.PathLike,
        overwrite: bool = False,
        save_probabilities: bool = False,
        uncertainty: bool | str = False,
        report: Callable[[SegmentResult], None] | None = None,
        formats: Sequence[str] | str = ("nifti",),
        shard: tuple[int, int] = (0, 1),
        prefetch: bool = False,
    ) -> list[SegmentResult]:
        """Segment a file, a folder of images, a folder of patient folders, a DICOM series folder, or
        a list of those.

        Writes ``<out_dir>/<id>_seg.nii.gz`` (uint8 label, input geometry; ``.png`` for PNG/TIFF
        inputs), with ``save_probabilities`` ``<id>_probabilities.nii.gz`` (float32, X×Y×Z×K) and with
        ``uncertainty`` ``<id>_uncertainty.nii.gz`` (float32 in [0, 1]); for PNG/TIFF inputs those two
        are float32 TIFFs of the input's size, ``<id>_probabilities.tiff`` with one page per class and
        ``<id>_uncertainty.tiff``. Every file is written atomically. A failing input is recorded and the
        next one processed; existing outputs are kept (status ``"skipped"``) unless ``overwrite``.
        ``report`` is called with each result as it comes.

        Files found in a sub-folder of an input folder (``patients/p01/image.nii.gz``) are written to
        the same sub-folder of ``out_dir`` (``<out_dir>/p01/image_seg.nii.gz``, created as needed), so
        patients whose files share a name do not collide (:func:`scan_input_folders`). Inputs given one
        by one whose outputs would share a name fail with an error naming both.

        Every input entry gets a result: hidden entries of a scanned folder are ``"ignored"`` with the
        reason (:func:`scan_inputs`), whatever goes wrong reading, predicting or writing one input
        fails that input alone, and outputs that cannot be written (folder not writable, a folder
        where a file must go, a name too long) fail their input before it is read or predicted.

        ``formats`` (``nifti``, ``dicom-seg``, ``rtstruct``) says which label files: for a DICOM series
        input ``dicom-seg`` / ``rtstruct`` write ``<id>_seg.dcm`` / ``<id>_rtstruct.dcm`` referencing it
        (:mod:`medunet.io.dicom.outputs`).

        ``shard=(rank, world_size)``: this process segments inputs ``rank, rank + world_size, ...`` of
        the scanned list (the same list in every process), so ``world_size`` processes (``torchrun``
        ranks, one per GPU or CPU share) write each case exactly once; output-name collisions are found
        over the whole list, and ignored entries are reported by rank 0 only; sub-folders created for
        inputs that failed are then kept (another rank may be writing into them). Entries inside
        ``out_dir`` and repeats of the same file are ``"ignored"`` with the reason.
        ``prefetch``: the next input that needs predicting is read in a background thread while this
        one is predicted (holds up to two inputs in memory). Off by default: on 2 CPU cores reading and
        predicting compete for the same cores (``scripts/bench_folder.py``: 0.99× for 10 CT phantoms);
        it is for slow storage or spare cores.
        """
        from medunet.io.dicom.outputs import parse_formats

        formats = parse_formats(formats)
        kind = None
        if uncertainty:
            kind = uncertainty if isinstance(uncertainty, str) else ("variance" if self.tta else "entropy")
            if kind not in UNCERTAINTY_KINDS or (kind == "variance" and not self.tta):
                raise ValueError(f"uncertainty {uncertainty!r}: use 'entropy', or 'variance' with TTA")
        previous = self.uncertainty
        self.uncertainty = kind
        out_dir = Path(out_dir)
        results: list[SegmentResult] = []
        try:
            found, left_out = scan_input_folders(inputs)
        except InputError as e:
            result = SegmentResult(input=str(e.path), status="failed", message=str(e))
            if report:
                report(result)
            return [result]
        rank, world = (int(v) for v in shard)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"shard {shard!r}: need 0 <= rank < world_size")
        items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
        found = _distinct_inputs(found, out_dir, left_out, frozenset(_resolved(Path(i)) for i in items))
        claimed = _claim_outputs(found, out_dir, save_probabilities, kind is not None, formats)
        found = found[rank::world]
        for entry, reason in left_out if rank == 0 else ():
            results.append(SegmentResult(str(entry), "ignored", message=f"{entry}: ignored: {reason}"))
            if report:
                report(results[-1])
        # every output folder that will be written to is checked (and created) before any input is read
        # or predicted; sub-folders created here that end up empty (their inputs failed) are removed
        pending: dict[Path, None] = {}  # the folders some output will be written to, in input order
        for path, rel in found:
            folder = out_dir / rel
            if folder not in pending and (overwrite or any(
                    not _is_file(o) for o in output_paths(path, folder, save_probabilities, kind is not None,
                                                          formats).values())):
                pending[folder] = None
        folder_problems: dict[Path, str | None] = {}
        created: list[Path] = []
        if pending:
            top = output_folder_problem(out_dir)
            for folder in pending:
                if top is not None or folder == out_dir:  # a sub-folder of an unusable folder: that one's problem
                    folder_problems[folder] = None if top is None else f"output folder {out_dir} {top}"
                    continue
                if not _exists(folder):
                    created.append(folder)
                problem = output_folder_problem(folder)
                folder_problems[folder] = None if problem is None else f"output folder {folder} {problem}"
        inputs_resolved = frozenset(_resolved(path) for path, _ in found)
        iterator = found
        if self.progress and len(found) > 1:
            from tqdm.auto import tqdm

            iterator = tqdm(found, desc="files", unit="file")

        def needs_reading(i: int) -> bool:
            path, rel = found[i]
            outs = output_paths(path, out_dir / rel, save_probabilities, kind is not None, formats)
            return (claimed.get(outs[next(iter(outs))]) == str(path) and folder_problems.get(out_dir / rel) is None
                    and (overwrite or any(not _is_file(o) for o in outs.values())))

        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medunet-read") if prefetch else None
        ahead: dict[int, Future] = {}
        nxt = 0  # the next input the read-ahead considers
        try:
            for i, (path, rel) in enumerate(iterator):
                folder = out_dir / rel
                if reader is not None:  # read the next input that will be predicted while this one is
                    nxt = max(nxt, i + 1)  # each later input is looked at once, however many are done
                    while nxt < len(found) and not needs_reading(nxt):
                        nxt += 1
                    if nxt < len(found) and nxt not in ahead:
                        ahead[nxt] = reader.submit(read_image, found[nxt][0])
                try:
                    result = self._segment_one(path, folder, overwrite, save_probabilities, kind is not None,
                                               claimed, folder_problems.get(folder), inputs_resolved, formats,
                                               image_future=ahead.pop(i, None))
                except Exception as e:  # _segment_one turns failures into results; this is the last guard
                    result = SegmentResult(str(path), "failed", message=f"{path}: {_one_line(e)}")
                results.append(result)
                if report:
                    report(result)
        finally:
            if reader is not None:
                for future in ahead.values():
                    future.cancel()
                reader.shutdown(wait=True, cancel_futures=True)
            self.uncertainty = previous
            for folder in created if world == 1 else ():  # other ranks may still write into shared folders
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty: nothing of this run (or another) is in it
        return results

    def _segment_one(self, path: Path, out_dir: Path, overwrite: bool, save_probabilities: bool,
                     save_uncertainty: bool, claimed: dict[Path, str], folder_problem: str | None = None,
                     inputs: frozenset[Path] = frozenset(), formats: Sequence[str] = ("nifti",),
                     image_future: Future | None = None) -> SegmentResult:
        """One input of :meth:`segment`: outputs checked, read (or taken from ``image_future``, a read
        started ahead), predicted, written; never raises (but for KeyboardInterrupt): any failure
        becomes this input's one-line ``"failed"`` result. ``claimed``: output path → the input that
        owns it (:func:`_claim_outputs`); another input's output is a collision."""
        start = time.perf_counter()
        from medunet.io.dicom.outputs import DICOM_FORMATS, build_dicom_outputs, write_dicom_outputs

        outs = output_paths(path, out_dir, save_probabilities, save_uncertainty, formats)
        taken = next((p for p in outs.values() if claimed.setdefault(p, str(path)) != str(path)), None)
        if taken is not None:
            clash = claimed[taken]
            hint = ("" if Path(clash).parent == path.parent else
                    f", or give the folder holding both as the input ({out_dir} then mirrors its sub-folders)")
            return SegmentResult(str(path), "failed", message=f"{path}: output name {taken.name} collides with "
                                 f"that of {clash} (both {taken}); rename one of them{hint}")
        if inputs and any(_resolved(p) in inputs for p in outs.values()):
            mine = next(p for p in outs.values() if _resolved(p) in inputs)
            return SegmentResult(str(path), "failed", message=f"{path}: not segmented: its output {mine} is one of "
                                 "the inputs; writing there would destroy it (choose another output folder)")
        # A case is complete when every requested output exists: skip it. An incomplete one (a run
        # killed between its writes) is predicted again and only its missing outputs are written, so
        # finished files are never touched without --overwrite.
        todo = {kind: p for kind, p in outs.items() if overwrite or not _is_file(p)}
        if not todo:
            return SegmentResult(str(path), "skipped", outputs=[str(p) for p in outs.values()],
                                 message=f"{path}: skipped (exists): {', '.join(map(str, outs.values()))} "
                                         "(--overwrite redoes it)")
        def failed(message: str) -> SegmentResult:
            return SegmentResult(str(path), "failed", seconds=time.perf_counter() - start, message=message)

        if folder_problem is not None:  # "output folder <folder> <why>"
            return failed(f"{path}: not segmented: {folder_problem}")
        for target in todo.values():
            problem = output_file_problem(target)
            if problem is not None:
                return failed(f"{path}: not segmented: output {target} {problem}")
        stage, target = "reading", None
        try:
            image = image_future.result() if image_future is not None else read_image(path)
            dicom_todo = [f for f in DICOM_FORMATS if f in todo]
            if dicom_todo and image.source != "dicom":
                raise InputError(path, f"--format {','.join(dicom_todo)} needs a DICOM series input (use --format nifti)")
            stage = "predicting"
            # the voxels are let go once in plan space (the NIfTI/PNG writers need only the geometry)
            pred = self.predict_image(image, probabilities="probabilities" in todo, release_input=not dicom_todo)
            stage = "writing"
            dicom = build_dicom_outputs(pred.label, image, dicom_todo, self.plan.labels)  # all built before any write
            out_dir.mkdir(parents=True, exist_ok=True)
            if "label" in todo:
                target = outs["label"]
                write_like(pred.label, image, target, dtype=np.uint8)
            if "probabilities" in todo:  # (K, *S): X×Y×Z×K NIfTI, or a K-page TIFF for a 2D image
                target = outs["probabilities"]
                write_maps_like(pred.probabilities, image, target)
            if "uncertainty" in todo:
                target = outs["uncertainty"]
                write_maps_like(pred.uncertainty, image, target)
            for fmt in dicom:
                target = todo[fmt]
                write_dicom_outputs({fmt: dicom[fmt]}, todo)
        except InputError as e:
            return failed(str(e) if e.path else f"{path}: {e.reason}")
        except MemoryError:
            return failed(f"{path}: out of memory while {stage} it (the image is too large for the free memory)")
        except OSError as e:
            where = f"cannot write {target}" if target is not None else f"{stage} failed"
            return failed(f"{path}: {where}: {os_error_words(e)}")
        except Exception as e:  # whatever a library raises for this one file, the batch goes on
            return failed(f"{path}: {stage} failed ({_one_line(e)})")
        return SegmentResult(str(path), "ok", outputs=[str(p) for p in outs.values()], shape=image.spatial_shape,
                             seconds=time.perf_counter() - start)


def _distinct_inputs(found: Sequence[tuple[Path, Path]], out_dir: Path, left_out: list[tuple[Path, str]],
                     given: frozenset[Path] = frozenset()) -> list[tuple[Path, Path]]:
    """``found`` without repeats of the same file and, when the output folder lies inside an input
    folder (``-i data -o data/pred``), without what a scan found in it (earlier outputs); each one left
    out is added to ``left_out`` with its reason. ``given``: the resolved inputs as given — those, and
    anything when ``out_dir`` is itself one of them, are never left out for lying in ``out_dir``. Every
    rank of a sharded run so sees the same list, whoever created ``out_dir`` first."""
    out = _resolved(out_dir)
    kept: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    for path, rel in found:
        real = _resolved(path)
        if out not in given and real not in given and (real == out or out in real.parents):
            left_out.append((path, f"inside the output folder {out_dir}, not read as an input"))
        elif real in seen:
            left_out.append((path, "the same file as an earlier input, segmented once"))
        else:
            seen.add(real)
            kept.append((path, rel))
    return kept


def _claim_outputs(found: Sequence[tuple[Path, Path]], out_dir: Path, probabilities: bool, uncertainty: bool,
                   formats: Sequence[str]) -> dict[Path, str]:
    """Output path → the first input (in ``found`` order) that writes it; an input any of whose
    outputs is already taken claims none (it fails as a collision)."""
    claimed: dict[Path, str] = {}
    for path, rel in found:
        outs = output_paths(path, out_dir / rel, probabilities, uncertainty, formats).values()
        if not any(o in claimed for o in outs):
            claimed.update((o, str(path)) for o in outs)
    return claimed


def _intersect(a: Sequence[slice], b: Sequence[slice]) -> tuple[slice, ...]:
    """Two boxes' common part (the second when they do not meet)."""
    out = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))
    return tuple(b) if any(s.stop <= s.start for s in out) else out


class _NotFinite(ArithmeticError):
    """The network's output holds NaN/Inf (the caller names the image)."""


def _argmax_label(chunk: torch.Tensor) -> torch.Tensor:
    """``(K, *S)`` probabilities → ``(*S)`` uint8 label: ``chunk.argmax(dim=0)`` (ties to the lower
    class), by K − 1 elementwise comparisons — torch's argmax over the leading axis of a CPU tensor is
    ~10× slower, and on a large CT this is the way back's main cost."""
    best = chunk[0].clone()
    label = torch.zeros(chunk.shape[1:], dtype=torch.uint8, device=chunk.device)
    for k in range(1, chunk.shape[0]):
        label.masked_fill_(chunk[k] > best, k)
        torch.maximum(best, chunk[k], out=best)
    return label


def channel_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel minimum and maximum ``(C,)`` of ``x`` (C, *S), without copying a large (strided)
    input. Equal everywhere (all zero, all air, all padding) means a blank scan: no structure, so its
    label is background everywhere (no network needed)."""
    dims = tuple(range(1, x.dim()))
    return x.amin(dim=dims), x.amax(dim=dims)


def body_box(x: torch.Tensor, threshold: float = -500.0, margin: int = 16, factor: int = 4) -> tuple[slice, ...]:
    """Bounding box of the body in a CT ``x`` (C, *S) in HU: voxels above ``threshold`` (air is about
    −1000 HU) found on a ``factor``× coarser grid (max-pooled, so a block counts when any voxel in it
    does), widened by ``margin`` voxels per side and clipped to the image. The whole image when
    nothing is above the threshold. Predicting background outside it is exact wherever the network
    predicts background in air ``margin`` voxels away from the body."""
    mask = x.amax(dim=0, keepdim=True).unsqueeze(0) > threshold  # (1, 1, *S)
    d = mask.dim() - 2
    if not bool(mask.any()):
        return tuple(slice(0, s) for s in x.shape[1:])
    pool = getattr(torch.nn.functional, f"max_pool{d}d")
    coarse = pool(mask.float(), kernel_size=factor, stride=factor, ceil_mode=True)[0, 0] > 0
    box = []
    for axis in range(d):
        other = tuple(a for a in range(d) if a != axis)
        hits = torch.nonzero(coarse.any(dim=other) if other else coarse).flatten()
        size = x.shape[1 + axis]
        lo = max(0, int(hits[0]) * factor - margin)
        hi = min(size, (int(hits[-1]) + 1) * factor + margin)
        box.append(slice(lo, hi))
    return tuple(box)


def output_paths(path: str | os.PathLike, out_dir: str | os.PathLike, probabilities: bool = False,
                 uncertainty: bool = False, formats: Sequence[str] | str = ("nifti",)) -> dict[str, Path]:
    """Where :meth:`Predictor.segment` writes the outputs for ``path`` in the folder ``out_dir``
    (``formats``: see :func:`medunet.io.dicom.outputs.parse_formats`): ``<id>_seg.nii.gz``, and
    ``<id>_probabilities.nii.gz`` / ``<id>_uncertainty.nii.gz``; for a PNG/TIFF input
    ``<id>_seg.png`` and ``<id>_probabilities.tiff`` / ``<id>_uncertainty.tiff``."""
    from medunet.io.dicom.outputs import dicom_output_names, parse_formats

    out_dir = Path(out_dir)
    case = image_id(path)
    label_ext, map_ext = (".png", ".tiff") if is_2d_image(path) else (".nii.gz", ".nii.gz")
    formats = parse_formats(formats)
    outs = {"label": out_dir / f"{case}_seg{label_ext}"} if "nifti" in formats else {}
    outs.update(dicom_output_names(case, out_dir, formats))
    if probabilities:
        outs["probabilities"] = out_dir / f"{case}_probabilities{map_ext}"
    if uncertainty:
        outs["uncertainty"] = out_dir / f"{case}_uncertainty{map_ext}"
    return outs


def collect_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The entries :meth:`Predictor.segment` reads for ``inputs`` (:func:`scan_inputs`' first list)."""
    return scan_inputs(inputs)[0]


def scan_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand inputs into what to read, and what is left out with the reason.

    * a file (or a missing path, a broken link) is read as it is;
    * a folder holding image files (NIfTI/PNG/TIFF names) is read as those files: every entry in it,
      sorted — its image files, and also its other files and links, so that every entry is segmented
      or refused by the reader with its reason (unknown extension, a broken link...); its DICOM files
      (``DICM`` marker or ``.dcm`` name), if any, are read together as one series (the folder itself);
    * a sub-folder of an input folder that holds image files (a patient folder such as ``p01/`` with
      ``image.nii.gz``) is read the same way, and its own sub-folders as DICOM series; any other
      sub-folder is one DICOM series (or, named like a file or empty, refused by the reader);
    * a folder of folders only: each sub-folder, as above;
    * any other folder: itself as one DICOM series, and each of its sub-folders as above.

    Hidden entries (``.name``: e.g. macOS ``._*`` and ``.DS_Store`` files, unfinished temporary files)
    of a folder read as its files are left out, each with its reason. Never raises for a bad item:
    unreadable folders are returned as they are, so that reading them fails for that item alone (one
    error line) and a batch goes on with the others.

    Returns:
        ``(paths to read, [(path, reason) left out])``.
    """
    found, left_out = scan_input_folders(inputs)
    return [path for path, _ in found], left_out


def scan_input_folders(inputs: str | os.PathLike | Iterable[str | os.PathLike],
                       ) -> tuple[list[tuple[Path, Path]], list[tuple[Path, str]]]:
    """:func:`scan_inputs` with, for each path to read, the sub-folder its outputs go to, relative to
    the output folder: ``Path(".")`` for a file given as it is and for an entry directly in an input
    folder (a DICOM series folder included), ``Path("p01")`` for an entry found in the sub-folder
    ``p01`` of an input folder. Outputs so mirror the input folder and never collide.

    Returns:
        ``([(path to read, relative output sub-folder)], [(path, reason) left out])``.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    here = Path(".")
    found: list[tuple[Path, Path]] = []
    left_out: list[tuple[Path, str]] = []
    for item in items:
        p = Path(item)
        listing = _listing(p) if _is_dir(p) else None
        if listing is None:  # files, missing/looping paths, unreadable folders: reading them says what is wrong
            found.append((p, here))
            continue
        entries, hidden = listing
        if _holds_images(entries):
            found.extend(_image_folder_entries(p, entries, hidden, here, left_out, expand=True))
            continue
        subdirs = [e for e in entries if _is_dir(e)]
        if len(subdirs) < len(entries) or not subdirs:
            found.append((p, here))  # its files are one DICOM series (or it is empty: reading it says so)
        for sub in subdirs:
            found.extend(_subfolder_entries(sub, left_out))
    return found, left_out


def _listing(folder: Path) -> tuple[list[Path], list[Path]] | None:
    """``(entries, hidden entries)`` of a folder, sorted; None when it cannot be listed."""
    try:
        everything = sorted(folder.iterdir())
    except OSError:
        return None
    return [e for e in everything if not e.name.startswith(".")], [e for e in everything if e.name.startswith(".")]


def _holds_images(entries: Sequence[Path]) -> bool:
    return any(_named_like_image(e) and not _is_dir(e) for e in entries)


def _subfolder_entries(sub: Path, left_out: list[tuple[Path, str]]) -> list[tuple[Path, Path]]:
    """A sub-folder of an input folder: its files when it holds images (outputs in ``<sub name>/``),
    else itself as one DICOM series (outputs beside the other entries')."""
    listing = None if _named_like_image(sub) else _listing(sub)
    if listing is None or not _holds_images(listing[0]):
        return [(sub, Path("."))]
    return _image_folder_entries(sub, *listing, Path(sub.name), left_out, expand=False)


def _image_folder_entries(folder: Path, entries: list[Path], hidden: list[Path], rel: Path,
                          left_out: list[tuple[Path, str]], expand: bool) -> list[tuple[Path, Path]]:
    """The entries of a folder holding image files, each with the output sub-folder ``rel``; its
    DICOM files as one entry, the folder itself (outputs beside the folder's own); its sub-folders
    expanded by :func:`_subfolder_entries` when ``expand``, else each one DICOM series."""
    left_out.extend((e, "hidden entry (its name starts with '.'), not read as an input") for e in hidden)
    found: list[tuple[Path, Path]] = []
    series = False
    for entry in entries:
        if _is_dir(entry):
            found.extend(_subfolder_entries(entry, left_out) if expand else [(entry, rel)])
        elif not _named_like_image(entry) and is_dicom_file(entry):
            series = True
        else:
            found.append((entry, rel))
    return ([(folder, Path("."))] if series else []) + found


def _is_dir(path: Path) -> bool:
    """``path.is_dir()``, False where it cannot be told (no search permission): reading it says why."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _named_like_image(path: Path) -> bool:
    return is_nifti(path) or is_2d_image(path)


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a looping link: never an output's path
        return path


def _one_line(error: BaseException, limit: int = 300) -> str:
    """``"TypeName: message"`` on one line, cut at ``limit`` characters."""
    text = " ".join(str(error).split())
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summary_table(results: Sequence[SegmentResult]) -> str:
    """A plain-text table: file, shape, seconds, status (and the reason for failures)."""
    rows = [("file", "shape", "time (s)", "status")]
    counts = Counter(Path(r.input).name for r in results)
    repeated = {n for n, c in counts.items() if c > 1}  # p01/image.nii.gz, p02/image.nii.gz: shown with the folder
    for r in results:
        shape = "x".join(str(s) for s in r.shape) if r.shape else "-"
        status = {"ok": "ok", "skipped": "skipped (exists)"}.get(r.status, f"{r.status}: {r.message}")
        if r.status == "ignored":
            status = r.message.split(": ignored: ", 1)[-1]
            status = f"ignored: {status}"
        name = Path(r.input).name
        name = str(Path(Path(r.input).parent.name, name)) if name in repeated else name
        rows.append((printable(name or r.input), shape, f"{r.seconds:.2f}", printable(status)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in rows]
    n_done = sum(r.done for r in results)
    n_skipped = sum(r.status == "skipped" for r in results)
    n_ignored = sum(r.status == "ignored" for r in results)
    lines.append(f"{n_done}/{len(results) - n_ignored} succeeded"
                 + (f" ({n_skipped} skipped: outputs exist)" if n_skipped else "")
                 + (f"; {n_ignored} entr{'y' if n_ignored == 1 else 'ies'} ignored" if n_ignored else ""))
    return "\n".join(lines)
