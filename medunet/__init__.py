"""medunet: MONAI-based 2D/3D medical image segmentation.

Subpackages: ``networks`` (factory + registry), ``data`` (phantoms, datalists, transforms, planning),
``engines`` (Ignite trainers/evaluators), ``inference`` (sliding-window / overlap-tile predictor),
``io`` (NIfTI/DICOM reading and atomic writing), ``metrics``, ``label`` (MONAI Label app).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
