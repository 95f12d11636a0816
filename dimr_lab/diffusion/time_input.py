"""What the network is given as time: (t_net, tau) from the schedule's continuous time t.

The network embeds `1000 * t_net` where time enters as a token or an adaLN embedding, and its time-dependent
tensors read `tau` (None: the network's default tau = 2 t_net - 1). Each form follows a released code path.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# DiMR sde.py VPSDE: nsr = expm1(int beta) clamped to [1e-12, 1e6], then snr = 1 / nsr clamped likewise; composed,
# the SNR lies in [1e-6, 1e6]
LOG_SNR_MIN, LOG_SNR_MAX = math.log(1e-6), math.log(1e6)


def discrete(schedule: Any, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The released latent path: t = n/N as it is; TD tensors read tau = log_snr / 4 with the code's
    log_snr = 8t - 4 (DiMR train.py), which is the network's default tau = 2t - 1."""
    return t.to(torch.float32), None


def vp_logsnr(schedule: Any, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The released pixel path: time tokens see 999 t (U-ViT sde.py ScoreModel: nnet(x, 999 t)), TD tensors
    read tau = ln SNR(t) / 4 (DiMR sde.py ScoreModel passes snr(t).log(); sigmoid/module.py divides by 4)."""
    t = t.to(torch.float64)
    log_snr = (2.0 * schedule.marginal_lambda(t)).clamp(LOG_SNR_MIN, LOG_SNR_MAX)  # ln(alpha^2 / sigma^2)
    return (0.999 * t).to(torch.float32), (log_snr / 4.0).to(torch.float32)
