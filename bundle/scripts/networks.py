"""The two AdaCS networks, built from MONAI parts.

* :class:`DiffeomorphicVoxelMorph`: the displacement estimator f_theta (the paper's 2D VoxelMorph,
  "vxm-1" features, stationary velocity integrated by scaling and squaring at half resolution).
* :class:`ScoringNet`: the scoring estimator g_phi (the same UNet trunk, one input channel, sigmoid; optionally
  with headroom above 1, :func:`score_from_logits`).

The network contract (what ``network_def`` in ``inference.yaml`` promises, see ``metadata.json``):
``net(image)`` with ``image`` of shape ``(B, 2, H, W)`` (channel 0 moving, channel 1 fixed) returns the
displacement field ``(B, 2, H, W)`` in pixels, pull convention as MONAI's ``Warp``
(``warped(x) = moving(x + ddf(x))``, channel ``i`` moves along spatial axis ``i``).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF, Convolution
from monai.networks.nets import VoxelMorphUNet
from torch import nn

# the paper's VoxelMorph ("vxm-1"): encoder 16,32,32,32 / decoder 32,32,32,32,32,16,16, four poolings (8x8 at
# 128x128). In MONAI terms the 8x8 conv is the bottom layer, hence 8 entries (a 6-entry list is one level short).
VXM1_CHANNELS: tuple[int, ...] = (16, 32, 32, 32, 32, 32, 32, 32)
VXM1_FINAL_CHANNELS: tuple[int, ...] = (16, 16)
VXM1_UNET_OUT_CHANNELS = 32


class RegistrationFields(NamedTuple):
    """What a training step needs from the displacement estimator."""

    forward_ddf: torch.Tensor  # moves the moving image onto the fixed one, (B, 2, H, W), pixels
    backward_ddf: torch.Tensor | None  # the inverse (fixed onto moving); None for one-way networks
    regularized_field: torch.Tensor  # the field the smoothness penalty acts on (velocity or ddf)


def _vxm1_unet(in_channels: int, out_channels: int, channels: Sequence[int], final_channels: Sequence[int]) -> nn.Module:
    """MONAI ``VoxelMorphUNet`` with ``in_channels`` inputs and ``out_channels`` outputs.

    MONAI's class insists on an even number of inputs and gives ``spatial_dims`` outputs; the first and the
    last convolutions are swapped for ones of the wanted widths (same kernel, same activation).
    """
    unet = VoxelMorphUNet(
        spatial_dims=2,
        in_channels=2,
        unet_out_channels=VXM1_UNET_OUT_CHANNELS,
        channels=tuple(channels),
        final_conv_channels=tuple(final_channels),
    )
    first = unet.net[0][0].conv
    if in_channels != first.in_channels:
        unet.net[0][0].conv = nn.Conv2d(in_channels, first.out_channels, first.kernel_size, padding=first.padding)
    head_in = final_channels[-1] if len(final_channels) else VXM1_UNET_OUT_CHANNELS
    unet.net[1].final_conv_out = Convolution(2, head_in, out_channels, kernel_size=3, act=None, conv_only=True)
    return unet


def _head(unet: nn.Module) -> nn.Conv2d:
    return unet.net[1].final_conv_out.conv


def resize_field(field: torch.Tensor, factor: float) -> torch.Tensor:
    """Resample a displacement/velocity field by ``factor`` and rescale its vectors (VoxelMorph's ResizeTransform)."""
    if factor == 1.0:
        return field
    if factor < 1.0:  # shrink first, then scale the vectors (as the reference code does)
        return factor * F.interpolate(field, scale_factor=factor, mode="bilinear", align_corners=True)
    return F.interpolate(factor * field, scale_factor=factor, mode="bilinear", align_corners=True)


class DiffeomorphicVoxelMorph(nn.Module):
    """2D VoxelMorph displacement estimator (Dalca et al. 2019), as AdaCS trains it.

    The UNet predicts a stationary velocity field at full resolution; it is resized to ``1/int_downsize``,
    integrated by scaling and squaring (MONAI ``DVF2DDF``, ``int_steps`` steps) and resized back.
    ``bidirectional`` also integrates ``-v`` for the inverse field.

    Args:
        int_steps: scaling-and-squaring steps; 0 gives a plain (non-diffeomorphic) displacement network.
        int_downsize: integrate at ``1/int_downsize`` resolution (the paper: 2).
        bidirectional: return the inverse field during training (the paper trains both directions).
        channels, final_conv_channels: MONAI ``VoxelMorphUNet`` features (default: the paper's vxm-1).
        head_init_std: std of the normal init of the flow head (VoxelMorph: 1e-5), bias zero.
        unet: another backbone ``(B, 2, H, W) -> (B, 2, H, W)`` predicting the velocity (or, with ``int_steps`` 0, the
            displacement) in the UNet's place, e.g. :class:`~scripts.transmorph.TransMorph2D`'s Swin network.
    """

    def __init__(
        self,
        int_steps: int = 7,
        int_downsize: int = 2,
        bidirectional: bool = True,
        channels: Sequence[int] = VXM1_CHANNELS,
        final_conv_channels: Sequence[int] = VXM1_FINAL_CHANNELS,
        head_init_std: float = 1e-5,
        unet: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if unet is None:  # the paper's VoxelMorph UNet; another backbone (``unet``) brings its own head init
            unet = _vxm1_unet(2, 2, channels, final_conv_channels)
            nn.init.normal_(_head(unet).weight, mean=0.0, std=head_init_std)
            nn.init.zeros_(_head(unet).bias)
            self.size_multiple = 2 ** (len(channels) // 2)  # H, W the UNet takes (vxm-1: 16); said by inference's check
        self.unet = unet
        self.int_steps = int_steps
        self.int_downsize = int_downsize
        self.bidirectional = bidirectional
        self.integrate = DVF2DDF(num_steps=int_steps, mode="bilinear", padding_mode="zeros") if int_steps > 0 else None

    def _velocity_to_ddf(self, velocity: torch.Tensor) -> torch.Tensor:
        ddf = self.integrate(velocity) if self.integrate is not None else velocity
        return resize_field(ddf, float(self.int_downsize))

    def forward(self, image: torch.Tensor, return_fields: bool = False) -> torch.Tensor | RegistrationFields:
        """``image``: (B, 2, H, W), moving then fixed. Returns the ddf, or all training fields if asked."""
        velocity = resize_field(self.unet(image), 1.0 / self.int_downsize)
        forward_ddf = self._velocity_to_ddf(velocity)
        if not return_fields:
            return forward_ddf
        backward_ddf = self._velocity_to_ddf(-velocity) if self.bidirectional else None
        return RegistrationFields(forward_ddf, backward_ddf, velocity)


def registration_fields(network: nn.Module, image: torch.Tensor) -> RegistrationFields:
    """Run any displacement network and return its training fields.

    Networks that know about velocities (``DiffeomorphicVoxelMorph``) report them; any other network that maps
    ``(B, 2, H, W) -> ddf`` (MONAI ``LocalNet``, ``RegUNet``, ...) is treated as one-way, and its ddf is
    what the smoothness penalty regularises. The call always goes through ``network.__call__`` so that a
    ``DistributedDataParallel`` wrapper synchronises gradients.
    """
    core = network.module if hasattr(network, "module") else network
    if isinstance(core, DiffeomorphicVoxelMorph):
        return network(image, return_fields=True)
    ddf = network(image)
    return RegistrationFields(ddf, None, ddf)


def score_from_logits(logits: torch.Tensor, headroom: float = 0.0) -> torch.Tensor:
    """S = (1 + headroom) * sigmoid(logits); ``headroom = 0`` is the paper's sigmoid (see :class:`ScoringNet`)."""
    return (1.0 + headroom) * torch.sigmoid(logits)


class ScoringNet(nn.Module):
    """Scoring estimator g_phi: a separate VoxelMorph UNet, one input image, sigmoid output (paper: in (0, 1)).

    ``S = (1 + headroom) * sigmoid(z)`` for the UNet's logit ``z``. ``headroom = 0`` is the paper: S in (0, 1), and
    S = 1 (the target of the pull term) lies at z = +inf, so wherever the residual is near zero the logit grows
    without bound; once the sigmoid saturates its gradient S (1 - S) vanishes and the network cannot come back
    (``docs/reports/paper_alpha.md``: 3 of 6 ACDC seeds at the paper's alpha). ``headroom > 0`` (ours, not the
    paper's) puts S = 1 at the finite logit ln(1 / headroom), where the sigmoid still has slope, and makes
    overshooting it cost something; the loss's optimum S* = 1 - r^2 / (2 alpha) is unchanged and lies in (0, 1].
    A network does not reach it exactly, so a few scores end above 1 (at most ``1 + headroom``; on ACDC with 0.05,
    1-13 % of the pixels, max 1.04).

    Like ``int_steps`` of the displacement network, ``headroom`` is a setting, not a weight: build the network with
    the value it was trained with (``score_headroom`` in the configs) to read its score maps.

    The head keeps PyTorch's default init, so scores start near 0.5 (as in the reference code).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = VXM1_CHANNELS,
        final_conv_channels: Sequence[int] = VXM1_FINAL_CHANNELS,
        headroom: float = 0.0,
    ) -> None:
        super().__init__()
        if headroom < 0:
            raise ValueError(f"headroom must be >= 0 (0 is the paper's sigmoid), got {headroom}.")
        self.unet = _vxm1_unet(in_channels, 1, channels, final_conv_channels)
        self.headroom = float(headroom)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return score_from_logits(self.unet(image), self.headroom)


class ZeroDisplacement(nn.Module):
    """The identity transform as a network (``(B, 2, H, W) -> zeros``): evaluates the undeformed baseline."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(image[:, :2])
