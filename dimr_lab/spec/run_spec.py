"""The run spec: one network + data + diffusion + training + sampling + evaluation (TOML sections).

`[model]` is a model spec (see `dimr_lab.spec.model_spec`): either `preset = "NAME"` plus any keys
that override the preset, or a full model spec. Everything else is validated here.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dimr_lab.errors import SpecError
from dimr_lab.spec.schema import field, from_dict, load_toml, set_dotted, to_dict


@dataclass
class DataSpec:
    name: str = field("shapes", choices=("shapes", "digits", "folder", "latents"),
                      help="built-in procedural shapes, sklearn digits, an ImageFolder tree, or VAE latents")
    image_size: int = field(0, min=0, help="side of the (pixel or latent) image the network sees; 0 = the "
                                           "model's image_size")
    num_classes: int = field(0, min=0, help="0: the dataset's own class count")
    train_size: int = field(4096, min=1, help="procedural datasets: number of training images")
    shape_size: list[float] = field(default_factory=lambda: [0.38, 0.48],
                                    help="shapes: [min, max] radius as a fraction of the side (0 < min <= max <= 0.5)")
    shape_palette: str = field("contrast", choices=("contrast", "random"),
                               help="shapes: 'contrast' = a light shape on a dark ground (the class mean is its "
                                    "silhouette); 'random' = two random colours (only the outline tells the class)")
    shape_jitter: float = field(0.2, min=0.0, max=1.0,
                                help="shapes: share of the free room the centre moves in (0: centred, 1: anywhere)")
    root: str = field("", help="folder / latents: the directory to read")
    vae: str = field("", help="latents: the diffusers AutoencoderKL folder that encoded them (decodes samples)")
    flip: bool = field(True, help="random horizontal flips")
    num_workers: int = field(0, min=0)


@dataclass
class DiffusionSpec:
    schedule: str = field("scaled_linear", choices=("scaled_linear", "cosine"))
    num_steps: int = field(1000, min=2)
    prediction: str = field("eps", choices=("eps",))
    multiscale_loss: bool = field(True, help="loss on every branch (DiMR), else the last branch only")
    loss_weights: list[float] = field(default_factory=list,
                                      help="per-branch weights, lowest resolution first; [] = 4^-(K-1-k)")
    label_drop: float = field(0.1, min=0.0, max=1.0, help="probability of the null label in training")


@dataclass
class TrainSpec:
    steps: int = field(1000, min=0)
    batch_size: int = field(64, min=1, help="global batch, split over processes")
    lr: float = field(2e-4, min=0.0)
    betas: list[float] = field(default_factory=lambda: [0.99, 0.99])
    weight_decay: float = field(0.03, min=0.0)
    no_decay: str = field("td_norms_biases", choices=("td_norms_biases", "td_only"),
                          help="parameters without weight decay: TD w/b, norms and biases; or TD w/b only "
                               "(the released code)")
    warmup_steps: int = field(5000, min=0)
    ema_decay: float = field(0.9999, min=0.0, max=1.0)
    grad_clip: float = field(0.0, min=0.0, help="0 = no clipping")
    precision: str = field("fp32", choices=("fp32", "bf16", "fp16"), help="autocast dtype on GPUs")
    activation_checkpointing: bool = field(False)
    compile: bool = field(False, help="torch.compile the model (GPUs)")
    seed: int = field(0, min=0)
    checkpoint_every: int = field(1000, min=1)
    log_every: int = field(50, min=1)
    time_limit_s: float = field(0.0, min=0.0, help="stop and checkpoint after this wall time (0 = none)")


@dataclass
class SampleSpec:
    sampler: str = field("dpm_solver++", choices=("dpm_solver++", "dpm_solver++_fast", "ddim"),
                         help="multistep DPM-Solver++, the singlestep 'fast' one of the released eval, or DDIM")
    steps: int = field(25, min=1, help="number of model evaluations per sample (x2 with guidance)")
    order: int = field(2, min=1, max=3, help="DPM-Solver++ order")
    t_end: float = field(1e-3, min=0.0, max=1.0)
    guidance_scale: float = field(0.0, help="U-ViT form: eps_c + s (eps_c - eps_u); 0 = no guidance")
    guidance_form: str = field("uvit", choices=("uvit", "dit"))
    guidance_schedule: str = field("constant", choices=("constant", "power_cosine"))
    guidance_power: float = field(1.0, min=0.0)
    use_ema: bool = field(True)
    grid_size: int = field(64, min=1)
    seed: int = field(0, min=0)


@dataclass
class EvalSpec:
    enabled: bool = field(True)
    samples: int = field(1000, min=1)
    batch_size: int = field(250, min=1)
    feature_extractor: str = field("classifier", choices=("classifier", "inception-v3-compat"))
    inception_weights: str = field("", help="path to torch-fidelity's inception weights (no download)")
    reference_stats: str = field("", help="ADM reference batch (.npz with mu/sigma) for paper-grade FID")
    reference_samples: int = field(0, min=0, help="real images for the reference statistics; 0 = eval.samples")
    metrics: list[str] = field(default_factory=lambda: ["fid", "kid", "isc", "prc"])
    distortion_threshold: float = field(0.5, min=0.0, max=1.0,
                                        help="a sample is low-fidelity when p(its class) is below this")
    kid_subset_size: int = field(100, min=2)


@dataclass
class RunSpec:
    model: dict = field(default_factory=lambda: {"preset": "dimr_tiny_3r"})
    data: DataSpec = field(default_factory=DataSpec)
    diffusion: DiffusionSpec = field(default_factory=DiffusionSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    sample: SampleSpec = field(default_factory=SampleSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)

    def validate(self) -> None:
        from dimr_lab.spec.model_spec import resolve_model

        self.model = to_dict(resolve_model(self.model, key="model"))
        lo_hi = self.data.shape_size
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 0.5:
            raise SpecError(f"must be [min, max] with 0 < min <= max <= 0.5, got {lo_hi!r}", key="data.shape_size")
        if not self.data.image_size:
            self.data.image_size = self.model["image_size"]
        if self.model["image_size"] != self.data.image_size:
            raise SpecError(f"the network takes {self.model['image_size']}x{self.model['image_size']} inputs "
                            f"(model.image_size) but data.image_size is {self.data.image_size}: set both",
                            key="data.image_size")


def load_run_spec(data: dict[str, Any] | str | Path | None = None, overrides: list[tuple[str, Any]] | None = None,
                  *, file: str | None = None) -> RunSpec:
    """Validate a run spec from a dict or a TOML path (None: the built-in default), with dotted overrides."""
    if data is None:
        from dimr_lab.spec.defaults import DEFAULT_RUN

        data, file = copy.deepcopy(DEFAULT_RUN), file or "<built-in default>"
    elif isinstance(data, (str, Path)):
        file = file or str(data)
        data = load_toml(data)
    else:
        data = copy.deepcopy(data)
    for key, value in overrides or []:
        set_dotted(data, key, value, file=file)
    return from_dict(RunSpec, data, file=file)


def spec_hash(spec: RunSpec | dict[str, Any], n: int = 8) -> str:
    """A short stable hash of a resolved spec (names run folders)."""
    data = to_dict(spec) if not isinstance(spec, dict) else spec
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:n]
