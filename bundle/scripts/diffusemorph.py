"""A 2D DiffuseMorph backbone (Kim et al., MICCAI 2022) from MONAI parts, for the paper's "Diffusion" rows.

:class:`DiffuseMorph2D` is the bundle's displacement estimator with DiffuseMorph's two networks in the UNet's place:

* the diffusion network, MONAI's ``DiffusionModelUNet`` (timestep embedding, residual blocks, self-attention in the
  middle block), takes ``[moving, fixed, x_t]`` with ``x_t`` the fixed image noised at a random timestep t of a DDPM
  schedule (MONAI's ``DDPMScheduler``, linear betas 1e-6 to 1e-2 over 2000 steps as the reference) and predicts the
  noise, eps_hat;
* the deformation network, the bundle's VoxelMorph UNet (vxm-1), takes ``[moving, eps_hat]`` (the reference 2D code
  feeds the moving image and the diffusion output; ``condition_on_fixed`` also gives it the fixed image, ours) and
  outputs the field (head N(0, 1e-5), so training starts near the identity).

In training mode the forward stores the diffusion loss ||eps - eps_hat||^2 (mean over pixels);
:meth:`DiffuseMorph2D.auxiliary_loss` returns it times ``diffusion_weight`` and the trainer adds it to L_de (logged as
``loss_auxiliary``). In eval mode t = 0 and x_t is the fixed image itself (no noise), as the reference's
``registration``: the field is deterministic (the trainer's scoring step, which re-runs the network in training mode
without gradients, warps with a noised x_t, as any training-mode forward). The forward and its outputs are ``DiffeomorphicVoxelMorph``'s, so it is
selected by ``network_def`` alone. Its default (and ``backbone_diffusemorph.yaml``'s) is the reference's field: the
displacement itself at full resolution (``int_steps`` 0, ``int_downsize`` 1, ``bidirectional`` false; strain then
needs ``lagrangian: swap``); ``int_steps`` > 0 integrates a velocity instead, as VoxelMorph.

Loss weights. The reference (AdaCS's ``diffusemorph_torch``, ``--lambda_L 20 --gamma 1``) minimises
l_pix + lambda_L * data + gamma * grad, with ``gamma`` weighting the smoothness of the flow (not the diffusion term,
whose weight is 1). Divided by lambda_L this is the bundle's data + lam * grad + ``diffusion_weight`` * l_pix with
``diffusion_weight`` = 1 / lambda_L = 0.05 (the default) and lam = gamma / lambda_L = 0.05 (``backbone_diffusemorph.yaml``
sets both; VoxelMorph's and TransMorph's lam is 0.01). The data term the momentum reads is the reference's
l_sim / lambda_L, as here.

Departures from the reference's 2D DiffuseMorph (90.7 M parameters: a 15.9 M SR3 diffusion UNet, channels
64-128-256-256, and a 74.7 M deformation UNet, 64 to 1024 channels; counted from ``DiffuseMorph/DiffuseMorph``'s
2D config and modules): channels 16-32-64-64 with one residual block per level and GroupNorm groups 8
(1.04 M), and the vxm-1 UNet as the deformation network (0.11 M), 1.14 M in all, so that it trains on a CPU;
``channels`` (64, 128, 256, 256) with ``norm_num_groups`` 32 gives a 16.5 M diffusion network. Images in [0, 1] (the
reference centres them to [-1, 1]); the diffusion loss is unmasked (the original DiffuseMorph; AdaCS's 3D copy masks
it with the background mask). Inputs ``(B, 2, H, W)`` with H, W multiples of 16.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler
from torch import nn

from .networks import VXM1_CHANNELS, VXM1_FINAL_CHANNELS, DiffeomorphicVoxelMorph, _head, _vxm1_unet


class DiffuseMorphFields(nn.Module):
    """``(B, 2, H, W)`` (moving, fixed) -> ``(B, 2, H, W)`` field: the diffusion network feeding the deformation
    network. Training mode draws t and the noise, and keeps ``diffusion_loss`` (None after an eval-mode forward)."""

    def __init__(self, diffusion: nn.Module, deformation: nn.Module, scheduler: DDPMScheduler,
                 condition_on_fixed: bool = False) -> None:
        super().__init__()
        self.diffusion = diffusion
        self.deformation = deformation
        self.scheduler = scheduler
        self.condition_on_fixed = condition_on_fixed
        self.diffusion_loss: torch.Tensor | None = None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        moving, fixed = image[:, :1], image[:, 1:2]
        if self.training:  # t ~ U{0, .., T-1}, then eps ~ N(0, 1): x_t = sqrt(abar_t) fixed + sqrt(1 - abar_t) eps
            t = torch.randint(0, self.scheduler.num_train_timesteps, (image.shape[0],), device=image.device)
            noise = torch.randn_like(fixed)
            x_t = self.scheduler.add_noise(fixed, noise, t)
        else:  # the reference's registration: t = 0, the fixed image unnoised
            t = torch.zeros(image.shape[0], dtype=torch.long, device=image.device)
            x_t = fixed
        eps_hat = self.diffusion(torch.cat([moving, fixed, x_t], dim=1), t)
        self.diffusion_loss = F.mse_loss(eps_hat, noise) if self.training else None
        inputs = [moving, fixed, eps_hat] if self.condition_on_fixed else [moving, eps_hat]
        return self.deformation(torch.cat(inputs, dim=1))


class DiffuseMorph2D(DiffeomorphicVoxelMorph):
    """The displacement estimator with DiffuseMorph's diffusion and deformation networks (see the module docstring).

    Args:
        int_steps, int_downsize, bidirectional: as ``DiffeomorphicVoxelMorph`` (default: the reference's direct
            full-resolution displacement, one way).
        channels, num_res_blocks, norm_num_groups, num_head_channels: MONAI ``DiffusionModelUNet`` sizes.
        num_train_timesteps, beta_start, beta_end: the DDPM schedule (linear betas; the reference: 2000, 1e-6, 1e-2).
        diffusion_weight: weight of ||eps - eps_hat||^2 in L_de (the reference: 1 / lambda_L = 1 / 20).
        condition_on_fixed: also give the deformation network the fixed image (ours; the reference does not).
        deformation_channels, deformation_final_channels: the deformation UNet's features (default vxm-1).
        head_init_std: std of the deformation head's normal init, bias zero.
    """

    def __init__(self, int_steps: int = 0, int_downsize: int = 1, bidirectional: bool = False,
                 channels: Sequence[int] = (16, 32, 64, 64), num_res_blocks: int = 1, norm_num_groups: int = 8,
                 num_head_channels: int | None = None, num_train_timesteps: int = 2000, beta_start: float = 1e-6,
                 beta_end: float = 1e-2, diffusion_weight: float = 0.05, condition_on_fixed: bool = False,
                 deformation_channels: Sequence[int] = VXM1_CHANNELS,
                 deformation_final_channels: Sequence[int] = VXM1_FINAL_CHANNELS, head_init_std: float = 1e-5) -> None:
        diffusion = DiffusionModelUNet(
            spatial_dims=2, in_channels=3, out_channels=1, channels=tuple(channels), num_res_blocks=num_res_blocks,
            attention_levels=(False,) * len(channels), norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels or channels[-1],  # one attention head, as the reference
        )
        deformation = _vxm1_unet(3 if condition_on_fixed else 2, 2, deformation_channels, deformation_final_channels)
        nn.init.normal_(_head(deformation).weight, mean=0.0, std=head_init_std)
        nn.init.zeros_(_head(deformation).bias)
        scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule="linear_beta",
                                  beta_start=beta_start, beta_end=beta_end)
        super().__init__(int_steps=int_steps, int_downsize=int_downsize, bidirectional=bidirectional,
                         unet=DiffuseMorphFields(diffusion, deformation, scheduler, condition_on_fixed))
        self.diffusion_weight = float(diffusion_weight)
        # H, W both UNets take (16 by default: the vxm-1 UNet's four poolings), said by inference's image_size check
        self.size_multiple = math.lcm(2 ** (len(deformation_channels) // 2), 2 ** (len(channels) - 1))

    def auxiliary_loss(self) -> torch.Tensor | None:
        """``diffusion_weight`` * ||eps - eps_hat||^2 of the last training-mode forward (None after an eval one)."""
        loss = self.unet.diffusion_loss
        return None if loss is None else self.diffusion_weight * loss
