"""Timestep sampling per expert (sigma space) and expert routing / alternation."""

from .routing import active_expert, expert_for_timestep, expert_step_counts, high_noise_mask, round_steps
from .timesteps import expert_sigma_range, loss_weights, sample_sigmas, timestep_cdf

__all__ = [
    "active_expert",
    "expert_for_timestep",
    "expert_step_counts",
    "high_noise_mask",
    "round_steps",
    "expert_sigma_range",
    "loss_weights",
    "sample_sigmas",
    "timestep_cdf",
]
