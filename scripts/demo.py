"""`make demo`: the main job on built-in data.

Today: builds every registered network in each dimension it supports and prints its shapes.
"""

from __future__ import annotations

import torch

from medunet import networks


def main() -> None:
    torch.manual_seed(0)
    print("seed U-Net (2015), 2D, 1 -> 2 classes:")
    seed = networks.create("unet2015", spatial_dims=2)
    print(f"  parameters {networks.count_parameters(seed):,}; 572x572 -> {seed.output_shape((572, 572))}")
    for stage, rows in seed.feature_shapes((572, 572)).items():
        print(f"  {stage}: {rows}")
    print("every network on a small input (tiny widths):")
    for name, spec in networks.available().items():
        for dims in spec.spatial_dims:
            net = networks.create(name, spatial_dims=dims, in_channels=1, out_channels=3, **spec.tiny_options)
            request = getattr(net, "img_size", None) or (48,) * dims
            shape = net.valid_input_shape(request)
            with torch.no_grad():
                out = net.eval()(torch.zeros(1, 1, *shape))
            print(f"  {name:<14} {dims}D  in {tuple(shape)} -> out {tuple(out.shape[2:])}")


if __name__ == "__main__":
    main()
