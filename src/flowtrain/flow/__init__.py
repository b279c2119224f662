"""Pure flow-matching math: interpolation, targets and timestep sampling. Tensors in, tensors out."""

from flowtrain.flow.path import interpolate, velocity_target
from flowtrain.flow.timesteps import restrict_sigmas, sample_sigmas, shift_sigmas

__all__ = ["interpolate", "velocity_target", "restrict_sigmas", "sample_sigmas", "shift_sigmas"]
