"""Pure flow-matching math: interpolation, targets and timestep sampling. Tensors in, tensors out."""

from flowtrain.flow.path import interpolate, velocity_target
from flowtrain.flow.timesteps import sample_sigmas, shift_sigmas

__all__ = ["interpolate", "velocity_target", "sample_sigmas", "shift_sigmas"]
