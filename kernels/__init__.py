"""gpubn.kernels: the batch-norm kernels, CUDA kernels beside their CPU twins.

Every kernel works on the canonical view ``(outer, C, inner)`` of the input,
``C`` being the feature axis (see ``gpubn.canonical_shape``).  Per-channel
constants travel packed in one small array (``rows``):

- ``coef`` (5, C), rows ``MEAN, VAR, INVSTD, SCALE, BIAS`` (forward);
- ``bcoef`` (5, C), rows ``B_MEAN, B_DY, B_X, B_CONST, B_BIAS`` (backward).

Modules: ``rows`` (the constants' rows), ``common`` (the merges, and the pieces every
reduction shares: row blocks and chunks on the CPU, ``reduction_config``, the
block reductions and the last-block ticket on the GPU), ``stats`` (batch
statistics; on the GPU a block per channel also writes y when a channel fits
one: ``common.one_pass``), ``normalize`` (the elementwise pass, fused with an
activation and a residual; the CPU forward drivers), ``backward``,
``activation`` (the activations, their slopes, the forward's element on the
GPU), ``plan`` (what a call's shape decides, decided once: which of these run,
and how).  The kernels can be launched directly with an explicit grid and
block (see ``examples/kernels_direct.py``).
"""

from .activation import ACTIVATIONS
from .backward import (
    backward_channels_cpu,
    backward_inner_cpu,
    backward_sums_channels_cpu,
    backward_sums_cuda,
    backward_sums_inner_cpu,
    input_grad_channels_cpu,
    input_grad_cuda_channels,
    input_grad_cuda_inner,
    input_grad_inner_cpu,
    launch_backward_cuda,
)
from .common import (
    CUDASIM,
    ONE_PASS_MAX,
    Launches,
    ReductionConfig,
    block_shape,
    chan_merge,
    elementwise_launch_config,
    launches,
    one_pass,
    reduction_config,
    reduction_splits,
)
from .normalize import (
    affine_coefficients_cpu,
    affine_coefficients_cuda,
    elementwise_cuda_vec4,
    forward_eval_channels_cpu,
    forward_eval_inner_cpu,
    forward_train_channels_cpu,
    forward_train_inner_cpu,
    launch_affine_coefficients_cuda,
    launch_scale_shift_cuda,
    scale_shift_channels_cpu,
    scale_shift_cpu,
    scale_shift_cuda_channels,
    scale_shift_cuda_inner,
    scale_shift_inner_cpu,
)
from .plan import CPUPlan, CUDAPlan, Mask, plan_for
from .rows import BIAS, INVSTD, MEAN, SCALE, VAR
from .stats import (
    batch_stats_cuda,
    channel_moments_channels_cpu,
    channel_moments_cpu,
    channel_moments_inner_cpu,
    finish_channels_cpu,
    launch_stats_cuda,
    moments_channels_cpu,
    moments_inner_cpu,
    stats_launch_config,
)

#: The earlier names of the reduction kernels, one per access regime, now one
#: kernel each (``common.reduction_slot``); the channels regime passes
#: ``inner_splits=None`` (before ``act``, or ``dx``) where it passed nothing.
batch_stats_cuda_inner = batch_stats_cuda_channels = batch_stats_cuda
backward_sums_cuda_inner = backward_sums_cuda_channels = backward_sums_cuda
