"""CT/MRI preprocessing and augmentation pipelines built from MONAI transforms, driven by a :class:`Plan`.

Three pipelines, all dictionary-based (``{"image": path, "label": path}``):

* :func:`train_transforms` — load, reorient, resample, crop to the nonzero region, normalise, sample
  pos/neg patches and augment (nnU-Net-like, plus the seed's elastic deformation).
* :func:`val_transforms` — the same deterministic preprocessing, whole (foreground-cropped) volume.
* :func:`infer_transforms` — image only; every geometric step is invertible, so
  ``monai.transforms.Invertd(keys="pred", transform=<this Compose>, orig_keys="image")`` brings a
  prediction back to the input file's exact grid.

Images are read by :class:`LoadMedunetImaged` through :class:`MedunetReader` (``medunet.io.read_image``):
NIfTI, DICOM series folders (LPS→RAS affine), PNG/TIFF 2D images, with medunet's one-line
:class:`~medunet.io.InputError` for bad input (MONAI's ``Compose`` wraps it in a ``RuntimeError``;
:func:`medunet.data.datasets.find_input_error` digs it out).
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.image_reader import ImageReader
from monai.transforms import (
    BorderPadd,
    Compose,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
    SpatialPadd,
    SqueezeDimd,
)
from monai.transforms import Orientationd as _MonaiOrientationd
from monai.utils import ensure_tuple

from medunet.data.augment import RandElasticDeformd
from medunet.data.plan import Plan, normalize_intensity
from medunet.data.weightmap import BorderWeightMapd
from medunet.io import InputError, is_2d_image, is_nifti, read_image

__all__ = [
    "MedunetReader", "LoadMedunetImaged", "NormalizeIntensityPland", "AddSliceAxisd", "Orientationd", "train_transforms", "val_transforms",
    "infer_transforms", "nonzero_region", "slice_axis", "uses_valid_convolutions",
]


# --------------------------------------------------------------------------------------------------
# reading
class MedunetReader(ImageReader):
    """A MONAI ``ImageReader`` backed by :func:`medunet.io.read_image`.

    Produces the same array layout as MONAI's ``NibabelReader`` — spatial axes in NIfTI order
    ``(X, Y[, Z])``, a trailing channel axis for 4D NIfTI — with the RAS affine in the metadata, so
    MONAI's ``Orientationd``/``Spacingd``/``Invertd`` work unchanged. A list of paths is stacked as
    channels (one file per modality, as in nnU-Net's ``_0000``/``_0001`` files).
    """

    def verify_suffix(self, filename) -> bool:
        return all(is_nifti(f) or is_2d_image(f) or os.path.isdir(f) for f in ensure_tuple(filename))

    def read(self, data, **kwargs):
        images = [read_image(p) for p in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        images = list(img) if isinstance(img, (list, tuple)) else [img]
        first = images[0]
        for other in images[1:]:
            if other.spatial_shape != first.spatial_shape or not np.allclose(other.affine, first.affine, atol=1e-3):
                raise InputError(other.path, f"channel file does not match {first.path} (shape or affine differs)")
        spatial = len(first.spatial_shape)
        if len(images) > 1:
            array = np.stack([im.array for im in images], axis=0)
            channel_dim: float = 0
        else:
            array = first.array
            channel_dim = -1 if array.ndim > spatial else float("nan")
        affine = np.asarray(first.affine, dtype=np.float64)
        meta = {
            "affine": affine.copy(),
            "original_affine": affine.copy(),
            "spatial_shape": np.asarray(first.spatial_shape),
            "original_channel_dim": channel_dim,
            "space": "RAS",
            "filename_or_obj": str(first.path),
            "medunet_source": first.source,
        }
        return array, meta


class LoadMedunetImaged(LoadImaged):
    """``LoadImaged`` that always reads through :class:`MedunetReader` (``MetaTensor`` output).

    The reader is passed at call time, so its :class:`~medunet.io.InputError` propagates (MONAI's
    reader loop would replace it by a generic "cannot find a suitable reader" message).
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        self._medunet_reader = MedunetReader()
        super().__init__(keys, reader=self._medunet_reader, image_only=True, allow_missing_keys=allow_missing_keys)

    def __call__(self, data, reader: ImageReader | None = None):
        return super().__call__(data, reader or self._medunet_reader)


# --------------------------------------------------------------------------------------------------
# small dictionary transforms MONAI lacks
class NormalizeIntensityPland(MapTransform):
    """Apply a plan's intensity normalisation (:func:`medunet.data.normalize_intensity`).

    Input/output ``(C, *S)``; output float32 with the input's metadata. Not geometric, so it does not
    interfere with ``Invertd``.
    """

    def __init__(self, keys: KeysCollection, normalization: dict, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalization = dict(normalization)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            raw = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(np.asarray(img))
            out = normalize_intensity(raw, self.normalization)
            if isinstance(img, MetaTensor):
                out = MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
            d[key] = out
        return d


class AddSliceAxisd(MapTransform):
    """Give 2D images a trailing singleton axis, ``(C, X, Y)`` → ``(C, X, Y, 1)``; 3D stays as is.

    Used by 2D plans so that 2D images and 3D volumes go through the same 3D patch sampling
    (patch ``(px, py, 1)``), after which :class:`~monai.transforms.SqueezeDimd` drops the slice axis.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key].ndim == 3:
                d[key] = d[key].unsqueeze(-1)
        return d


class Orientationd(_MonaiOrientationd):
    """MONAI ``Orientationd`` whose axcodes are cut to each image's spatial dims (``"RAS"`` → ``"RA"`` for
    2D images), so one pipeline serves 2D images and 3D volumes; inverts like MONAI's."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict:
        first = next(iter(self.key_iterator(dict(data))), None)
        if first is not None and self.ornt_transform.axcodes:
            full = self._full_axcodes = getattr(self, "_full_axcodes", self.ornt_transform.axcodes)
            self.ornt_transform.axcodes = full[: max(data[first].ndim - 1, 1)]
        return super().__call__(data, lazy)


def nonzero_region(x: torch.Tensor) -> torch.Tensor:
    """Foreground-crop selector: voxels that are nonzero in any channel (everything if none are)."""
    mask = x != 0
    return mask if bool(mask.any()) else torch.ones_like(mask)


def uses_valid_convolutions(plan: Plan) -> bool:
    """Whether the plan's network loses a border (``padding="valid"``, e.g. the seed's ``unet2015``)."""
    import inspect

    from medunet import networks

    try:
        spec = networks.get_spec(plan.network.get("name", ""))
    except ValueError:
        return False
    default = inspect.signature(spec.builder).parameters.get("padding")
    padding = plan.network.get("padding", default.default if default is not None else "same")
    return padding == "valid"


def slice_axis(plan: Plan) -> int:
    """For a 2D plan applied to 3D volumes: the axis slices are taken across (last RAS axis = axial)."""
    return 2


# --------------------------------------------------------------------------------------------------
# pipelines
def _keys(keys: Sequence[str]) -> tuple[str, str | None]:
    keys = tuple(keys)
    if not keys:
        raise ValueError("keys must name at least the image key")
    return keys[0], (keys[1] if len(keys) > 1 else None)


def _pixdim(plan: Plan) -> list[float] | None:
    """Spacingd target: the plan's spacing; a 2D plan keeps the native slice spacing of 3D volumes."""
    if plan.target_spacing is None:
        return None
    spacing = [float(s) for s in plan.target_spacing]
    if plan.spatial_dims == 2:
        spacing = spacing[:2] + [0.0]  # non-positive = keep; ignored for 2D images
    return spacing


def _preprocessing(plan: Plan, image_key: str, label_key: str | None, crop: bool = True,
                   extra_label_keys: Sequence[str] = ()) -> list:
    """Deterministic part shared by all pipelines: load → channel-first → crop nonzero → RAS → spacing → normalise."""
    keys = [k for k in (image_key, label_key, *extra_label_keys) if k]
    steps: list = [
        LoadMedunetImaged(keys),
        EnsureChannelFirstd(keys),
    ]
    if crop:
        steps.append(CropForegroundd(keys, source_key=image_key, select_fn=nonzero_region, allow_smaller=True,
                                     start_coord_key=None, end_coord_key=None))
    steps.append(Orientationd(keys, axcodes=plan.orientation, labels=None))
    pixdim = _pixdim(plan)
    if pixdim is not None:
        modes = ["bilinear"] + ["nearest"] * (len(keys) - 1)
        # float32 resampling (MONAI's default computes in float64: a transient of ~4 input sizes on a
        # large CT); the Predictor's PlanGrid.resample_image uses the same, so both stay identical
        steps.append(Spacingd(keys, pixdim=pixdim, mode=modes, dtype=torch.float32))
    steps.append(NormalizeIntensityPland(image_key, plan.normalization))
    steps.append(EnsureTyped(image_key, dtype=torch.float32, track_meta=True))
    if len(keys) > 1:
        steps.append(EnsureTyped(keys[1:], dtype=torch.float32, track_meta=True))
    return steps


def _anisotropic_axis(plan: Plan) -> int | None:
    """Index of the low-resolution axis when the plan's spacing is anisotropic (max/min > 3)."""
    if plan.spatial_dims != 3 or not plan.target_spacing:
        return None
    sp = [float(s) for s in plan.target_spacing]
    return int(np.argmax(sp)) if max(sp) / max(min(sp), 1e-8) > 3 else None


def _augmentations(plan: Plan, keys: list[str], image_key: str, elastic: bool, elastic_sigma: float,
                   elastic_prob: float) -> list:
    """nnU-Net-like spatial + intensity augmentation of a patch ``(C, *patch_size)`` (shape preserved)."""
    dims = plan.spatial_dims
    patch = [int(p) for p in plan.patch_size]
    # image bilinear, label nearest, anything after (a weight map) bilinear
    label_modes = (["bilinear", "nearest"] + ["bilinear"] * len(keys))[: len(keys)]
    low_res = _anisotropic_axis(plan)
    in_plane = [a for a in range(dims) if a != low_res]
    # rotation: any axis for isotropic 3D; in-plane only (about the low-res axis) for anisotropic data
    if dims == 2:
        rotate_range: Sequence[float] = (math.pi,)
    elif low_res is None:
        rotate_range = (math.pi / 6,) * 3
    else:
        rotate_range = tuple(math.pi / 6 if a == low_res else 0.0 for a in range(3))
    steps: list = []
    if elastic:
        steps.append(RandElasticDeformd(keys, sigma=elastic_sigma, grid_points=3, prob=elastic_prob,
                                        mode=label_modes, padding_mode="reflection"))
    steps.append(RandAffined(keys, prob=0.2, rotate_range=rotate_range, scale_range=(0.3,) * dims,
                             mode=label_modes, padding_mode="zeros", spatial_size=patch, cache_grid=True))
    # rot90 only between axes of equal patch length (otherwise batching breaks)
    pair = next(((a, b) for i, a in enumerate(in_plane) for b in in_plane[i + 1:] if patch[a] == patch[b]), None)
    if pair is not None:
        steps.append(RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=pair))
    steps += [RandFlipd(keys, prob=0.5, spatial_axis=a) for a in range(dims)]
    steps += [
        RandGaussianNoised(image_key, prob=0.1, mean=0.0, std=0.1),
        RandGaussianSmoothd(image_key, prob=0.1, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        RandScaleIntensityd(image_key, prob=0.15, factors=0.25),
        RandShiftIntensityd(image_key, prob=0.15, offsets=0.1),
        RandAdjustContrastd(image_key, prob=0.15, gamma=(0.7, 1.5)),
    ]
    return steps


def train_transforms(
    plan: Plan,
    augment: bool = True,
    keys: Sequence[str] = ("image", "label"),
    num_samples: int = 1,
    elastic: bool | None = None,
    elastic_sigma: float = 10.0,
    elastic_prob: float = 0.5,
    pos_neg: tuple[float, float] = (1.0, 1.0),
    weight_map: bool = False,
    instance_key: str | None = None,
    weight_map_options: dict | None = None,
) -> Compose:
    """Training pipeline: a data dict of paths → ``num_samples`` augmented patches.

    Steps: read (:class:`MedunetReader`) → channel-first → crop to the image's nonzero region →
    ``Orientationd(plan.orientation)`` → ``Spacingd(plan.target_spacing)`` (bilinear image, nearest
    label; skipped when the plan keeps native spacing) → :class:`NormalizeIntensityPland` → pad to the
    patch (zeros; for valid-convolution networks such as ``unet2015`` the image and label are first
    mirrored by the network's margin on every side, the weight map zero-padded, so the output tile
    reaches every pixel) → ``RandCropByPosNegLabeld(plan.patch_size)`` (whole image when the patch covers it) →
    (``augment``) elastic (optional) / affine rotation+scaling / rot90 / flips / noise / blur /
    brightness / shift / gamma.

    A 2D plan accepts 2D images and 3D volumes: volumes are sampled slice-wise (axial, across the last
    RAS axis) with patch ``(px, py, 1)`` whose slice axis is then dropped.

    Args:
        plan: the experiment :class:`Plan`.
        augment: add the random augmentations.
        keys: ``(image_key, label_key)``.
        num_samples: patches drawn per case (the pipeline returns a list of that many dicts; MONAI's
            ``DataLoader``/``list_data_collate`` flattens them into the batch).
        elastic: the seed's elastic deformation (:class:`~medunet.data.augment.RandElasticDeformd`);
            ``None`` → on for 2D plans (the seed's setting), off for 3D (its cost on CPU).
        elastic_sigma, elastic_prob: σ of the grid displacements (voxels) and probability per patch.
        pos_neg: ratio of patches centred on foreground vs background.
        weight_map: add the seed's border weight map (:class:`~medunet.data.weightmap.BorderWeightMapd`,
            computed once per case after resampling, then cropped/augmented with the label) as
            ``"weight"`` ``(1, *plan.patch_size)``; zero in padding.
        instance_key: item key of an instance map (e.g. the cell phantoms' ``"instance"``) for the
            weight map; without it objects are connected components of the label.
        weight_map_options: ``w0``, ``sigma``, ``class_weights``, ``background_only`` overrides.

    Returns:
        ``Compose`` producing a list of ``num_samples`` dicts with ``"image"``: float32 ``MetaTensor``
        ``(C, *plan.patch_size)`` and ``"label"``: float32 (integer-valued) ``(1, *plan.patch_size)``
        (plus ``"weight"`` with ``weight_map``).
    """
    image_key, label_key = _keys(keys)
    if label_key is None:
        raise ValueError("train_transforms needs keys=(image_key, label_key)")
    keys_l = [image_key, label_key]
    dims = plan.spatial_dims
    patch = [int(p) for p in plan.patch_size]
    extra = [instance_key] if (weight_map and instance_key) else []
    steps = _preprocessing(plan, image_key, label_key, extra_label_keys=extra)
    if weight_map:
        steps.append(BorderWeightMapd(label_key, instance_key=instance_key, output_key="weight",
                                      **(weight_map_options or {})))
        if extra:
            steps.append(DeleteItemsd(extra))
        keys_l.append("weight")
    sample_patch = patch + [1] if dims == 2 else patch
    if dims == 2:
        steps.append(AddSliceAxisd(keys_l))
    if uses_valid_convolutions(plan):
        # valid convolutions: the output tile is smaller than the input by a margin. Mirror the image
        # (and label) by that margin on every side, as the seed's overlap-tile does, so output tiles can
        # land anywhere on the image, its border pixels included; the weight map is 0 in the mirrored
        # band, so no pixel is counted twice
        border = list(plan.build_network().input_margin(patch)) + ([0] if dims == 2 else [])
        mirrored = [k for k in keys_l if k != "weight"]
        steps += [BorderPadd(mirrored, spatial_border=border, mode="symmetric"),
                  SpatialPadd(mirrored, spatial_size=sample_patch, mode="symmetric")]
        if weight_map:
            steps += [BorderPadd("weight", spatial_border=border, mode="constant"),
                      SpatialPadd("weight", spatial_size=sample_patch, mode="constant")]
    else:
        steps.append(SpatialPadd(keys_l, spatial_size=sample_patch, mode="constant"))
    steps += [
        RandCropByPosNegLabeld(keys_l, label_key=label_key, spatial_size=sample_patch, pos=pos_neg[0],
                               neg=pos_neg[1], num_samples=num_samples, image_key=image_key,
                               allow_smaller=False),
    ]
    if dims == 2:
        steps.append(SqueezeDimd(keys_l, dim=-1))
    if augment:
        use_elastic = (dims == 2) if elastic is None else bool(elastic)
        steps += _augmentations(plan, keys_l, image_key, use_elastic, elastic_sigma, elastic_prob)
    steps.append(EnsureTyped(keys_l, dtype=torch.float32, track_meta=True))
    return Compose(steps)


def val_transforms(plan: Plan, keys: Sequence[str] = ("image", "label")) -> Compose:
    """Validation pipeline (deterministic, no patch cropping).

    Steps as :func:`train_transforms` up to normalisation: read → channel-first → crop nonzero → RAS →
    spacing → normalise.

    Returns:
        ``Compose`` producing one dict with ``"image"``: float32 ``MetaTensor`` ``(C, *S)`` and
        ``"label"``: float32 ``(1, *S)``, ``S`` the cropped, resampled whole image (3D volumes stay 3D
        for 2D plans: predict them slice-wise, e.g. ``monai.inferers.SliceInferer(spatial_dim=2)``).
        Sliding-window inference pads as needed; ``S`` is not rounded to a network-valid size.
    """
    image_key, label_key = _keys(keys)
    return Compose(_preprocessing(plan, image_key, label_key))


def infer_transforms(plan: Plan, keys: Sequence[str] = ("image",)) -> Compose:
    """Inference pipeline (image only), invertible.

    Steps: read → channel-first → crop nonzero → RAS → spacing → normalise. Every geometric step is
    recorded in the ``MetaTensor``'s ``applied_operations``, so
    ``Invertd(keys="pred", transform=this, orig_keys="image", nearest_interp=False)`` maps a ``(K, *S)``
    prediction back to the input file's grid (outside the cropped region: zeros, i.e. background).

    Returns:
        ``Compose`` producing ``{"image": float32 MetaTensor (C, *S), ...}``.
    """
    image_key, _ = _keys(keys)
    return Compose(_preprocessing(plan, image_key, None))
