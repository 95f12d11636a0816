"""Diffusion maths: noise schedules, the multi-scale loss, classifier-free guidance and samplers."""

from .guidance import guidance_scale_at, guided_eps_fn, power_cosine_ramp
from .loss import default_loss_weights, diffusion_loss, multiscale_targets, training_targets
from .samplers import SAMPLERS, ddim_steps, sample, time_grid
from .schedule import SCHEDULES, NoiseSchedule, build_schedule

__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "NoiseSchedule",
    "build_schedule",
    "ddim_steps",
    "default_loss_weights",
    "diffusion_loss",
    "guidance_scale_at",
    "guided_eps_fn",
    "multiscale_targets",
    "power_cosine_ramp",
    "sample",
    "time_grid",
    "training_targets",
]
