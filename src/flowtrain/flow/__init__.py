"""Pure flow-matching math: interpolation, targets and timestep sampling. Tensors in, tensors out."""

from flowtrain.flow.path import interpolate, velocity_target
from flowtrain.flow.timesteps import flux2_empirical_mu, resolution_shift, sample_sigmas, shift_sigmas

__all__ = ["interpolate", "velocity_target", "sample_sigmas", "shift_sigmas", "flux2_empirical_mu", "resolution_shift"]
