"""How a network's output size relates to its input size.

Every medunet network mixes in :class:`ShapeRuleMixin`, so the planner and the overlap-tile predictor
can ask any network ``output_shape(input_shape)``, ``valid_input_shape(shape)`` and the per-axis margin
that valid convolutions eat. Calling a network on a spatial size it cannot process raises a
``ValueError`` that names the nearest valid sizes, before any compute.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ShapeRuleMixin"]

_SEARCH_LIMIT = 4096


class ShapeRuleMixin:
    """Shape arithmetic shared by all registered networks.

    Subclasses implement :meth:`axis_output_size`, returning the output length along one spatial axis
    for an input length, or ``None`` when that length is not valid for the network.
    """

    def axis_output_size(self, size: int, axis: int) -> int | None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- public API -------------------------------------------------------------------------------
    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial output shape for a spatial ``input_shape`` (e.g. ``(572, 572)`` → ``(388, 388)``)."""
        self.check_input_shape(input_shape)
        return tuple(int(self.axis_output_size(int(s), a)) for a, s in enumerate(input_shape))

    def is_valid_input_shape(self, input_shape: Sequence[int]) -> bool:
        return all(self.axis_output_size(int(s), a) is not None for a, s in enumerate(input_shape))

    def valid_input_shape(self, input_shape: Sequence[int], mode: str = "up") -> tuple[int, ...]:
        """The valid spatial shape closest to ``input_shape``.

        Args:
            input_shape: desired spatial size.
            mode: ``"up"`` (smallest valid size >= the request; what a patch planner wants),
                ``"down"`` (largest valid size <= the request) or ``"nearest"`` (ties go up).
        """
        if mode not in ("up", "down", "nearest"):
            raise ValueError(f"mode must be 'up', 'down' or 'nearest', got {mode!r}")
        out = []
        for axis, size in enumerate(input_shape):
            below, above = self._nearest_valid(int(size), axis)
            if mode == "up":
                choice = above if above is not None else below
            elif mode == "down":
                choice = below if below is not None else above
            else:
                candidates = [c for c in (below, above) if c is not None]
                choice = min(candidates, key=lambda c: (abs(c - size), -c)) if candidates else None
            if choice is None:
                raise ValueError(f"{type(self).__name__}: no valid input size near {size} on axis {axis}")
            out.append(choice)
        return tuple(out)

    def input_margin(self, input_shape: Sequence[int] | None = None) -> tuple[int, ...]:
        """Voxels lost at each border per axis: ``(input - output) // 2`` (0 for 'same' networks)."""
        dims = int(getattr(self, "spatial_dims", 3))
        shape = tuple(input_shape) if input_shape is not None else self.valid_input_shape((1,) * dims)
        shape = self.valid_input_shape(shape)
        out = self.output_shape(shape)
        return tuple((i - o) // 2 for i, o in zip(shape, out))

    def check_input_shape(self, input_shape: Sequence[int]) -> None:
        """Raise ``ValueError`` naming the nearest valid sizes when ``input_shape`` is not valid."""
        dims = getattr(self, "spatial_dims", None)
        if dims is not None and len(input_shape) != dims:
            raise ValueError(
                f"{type(self).__name__} is {dims}D but got a spatial shape with {len(input_shape)} axes: "
                f"{tuple(int(s) for s in input_shape)}"
            )
        problems = []
        for axis, size in enumerate(input_shape):
            if self.axis_output_size(int(size), axis) is None:
                below, above = self._nearest_valid(int(size), axis)
                near = " or ".join(str(c) for c in (below, above) if c is not None) or "none found"
                problems.append(f"axis {axis}: {int(size)} (nearest valid: {near})")
        if problems:
            shape = tuple(int(s) for s in input_shape)
            raise ValueError(
                f"{type(self).__name__}: invalid input size {shape}: " + "; ".join(problems)
                + f"; e.g. use {self.valid_input_shape(shape, 'nearest')}"
            )

    # -- helpers ------------------------------------------------------------------------------------
    def _nearest_valid(self, size: int, axis: int) -> tuple[int | None, int | None]:
        below = next((s for s in range(size, 0, -1) if self.axis_output_size(s, axis) is not None), None)
        above = next(
            (s for s in range(max(size, 1), size + _SEARCH_LIMIT) if self.axis_output_size(s, axis) is not None),
            None,
        )
        return below, above

    def __call__(self, *args, **kwargs):
        # Shape check before any compute. Done in __call__ (not forward) so TorchScript export and
        # state_dict keys of wrapped MONAI networks stay untouched.
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 3:
            self.check_input_shape(tuple(args[0].shape[2:]))
        return super().__call__(*args, **kwargs)


def divisible_rule(size: int, divisor: int, minimum: int = 1) -> int | None:
    """Output size for 'same'-padded encoders that need ``size % divisor == 0``."""
    if size < max(minimum, 1) or size % divisor:
        return None
    return size
