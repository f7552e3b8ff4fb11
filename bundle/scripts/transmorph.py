"""A 2D TransMorph backbone (Chen et al., MedIA 2022) from MONAI parts, for the paper's "Transformer" rows.

:class:`TransMorph2D` is the bundle's displacement estimator with the VoxelMorph UNet replaced by MONAI's
``SwinUNETR`` (``spatial_dims=2``): a Swin Transformer encoder (patch 2, window 7, depths 2-2-2-2, heads 3-6-12-24)
and its convolutional UNETR decoder with skip connections, whose 1x1 output convolution is the registration head
(initialised N(0, 1e-5), bias 0, as VoxelMorph's and TransMorph's heads, so training starts near the identity). It
predicts a stationary velocity integrated by scaling and squaring at 1/``int_downsize`` (``int_steps`` > 0; the
inverse field is available, so strain, refinement and every path of the bundle work unchanged) or, with
``int_steps: 0``, the displacement itself (TransMorph's default; train it ``bidirectional: false``).

Departures from the reference's 2D TransMorph (RaFD/TransMorph2D, 15.2 M parameters at 256 x 256): MONAI's
SwinUNETR decoder rather than TransMorph's (which upsamples without a transformer skip at full resolution), and
``feature_size`` 24 by default (6.3 M parameters) so that it trains on a CPU; ``feature_size`` 48 gives 25.1 M.
Needs ``einops`` (MONAI's Swin blocks use it).
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.nets import SwinUNETR
from torch import nn

from .networks import DiffeomorphicVoxelMorph, RegistrationFields


def swin_backbone(feature_size: int = 24, depths: Sequence[int] = (2, 2, 2, 2),
                  num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
                  head_init_std: float = 1e-5) -> nn.Module:
    """MONAI's 2D SwinUNETR, 2 channels in (moving, fixed), 2 out (the field), its output convolution re-initialised."""
    net = SwinUNETR(in_channels=2, out_channels=2, feature_size=feature_size, depths=tuple(depths),
                    num_heads=tuple(num_heads), window_size=window_size, spatial_dims=2)
    head = net.out.conv.conv
    nn.init.normal_(head.weight, mean=0.0, std=head_init_std)
    nn.init.zeros_(head.bias)
    return net


class TransMorph2D(DiffeomorphicVoxelMorph):
    """The displacement estimator with a Swin Transformer backbone (see the module docstring). Inputs ``(B, 2, H, W)``
    with H, W multiples of 32 (patch 2 and four 2x merges)."""

    def __init__(self, int_steps: int = 7, int_downsize: int = 2, bidirectional: bool = True, feature_size: int = 24,
                 depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, head_init_std: float = 1e-5) -> None:
        super().__init__(int_steps=int_steps, int_downsize=int_downsize, bidirectional=bidirectional,
                         unet=swin_backbone(feature_size, depths, num_heads, window_size, head_init_std))
        self.size_multiple = self.unet.patch_size ** 5  # 32: said by inference's image_size check

    def forward(self, image: torch.Tensor, return_fields: bool = False) -> torch.Tensor | RegistrationFields:
        if torch.jit.is_tracing():  # MONAI checks the size only when not tracing: an export at a wrong size says why
            self.unet._check_input_size(tuple(int(s) for s in image.shape[2:]))
        return super().forward(image, return_fields)
