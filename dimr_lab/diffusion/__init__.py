"""Diffusion maths: noise schedules, time inputs, the training step, guidance and samplers."""

from .guidance import guidance_scale_at, guided_eps_fn, power_cosine_ramp
from .samplers import ddim_steps, sample, time_grid
from .schedule import NoiseSchedule, build_schedule
from .training import Draws, default_loss_weights, diffusion_loss, draw, loss_weights, model_inputs, \
    multiscale_targets, training_loss

__all__ = [
    "Draws",
    "NoiseSchedule",
    "build_schedule",
    "ddim_steps",
    "default_loss_weights",
    "diffusion_loss",
    "draw",
    "guidance_scale_at",
    "guided_eps_fn",
    "loss_weights",
    "model_inputs",
    "multiscale_targets",
    "power_cosine_ramp",
    "sample",
    "time_grid",
    "training_loss",
]
