"""The run spec: one network + data + diffusion + training + sampling + evaluation (TOML sections).

`[model]` is a model spec (see `dimr_lab.spec.model_spec`): either `preset = "NAME"` plus any keys
that override the preset, or a full model spec. Names of datasets, schedules, samplers, extractors and
metrics come from the registries (`dimr-lab components`).

A run's identity is what it trains (`RunSpec.identity`): the model, the data, the diffusion process and
the training recipe, without the keys that leave the trained weights unchanged (logging and checkpoint
cadence, threads, workers) and without `train.steps` when the learning rate does not depend on the total
(warm-up then constant): the same run trained longer is the same run, continued. Sampling and evaluation
settings name an evaluation of a run (`RunSpec.eval_identity`), never the run itself.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dimr_lab.errors import SpecError
from dimr_lab.registry import DATASETS, EXTRACTORS, LR_SCHEDULES, METRICS, SAMPLERS, SCHEDULES, TIME_INPUTS
from dimr_lab.spec.model_spec import ModelSpec, parse_model, resolve_model
from dimr_lab.spec.schema import field, from_dict, load_toml, set_dotted, to_dict

MAX_SEED = 2**32 - 1
SKIP_TYPES = ("time_uniform", "logSNR")
# vp_linear betas: 0.1 and 20 in the released recipes; far larger ones overflow the samplers' exp(h)
MAX_BETA = 1000.0
LABEL_RULES = ("balanced", "frequency")
INIT_DRAWS = ("stream", "by_name")
# an evaluation whose EMA weights still hold this share of the initial random weights gets a note (RunSpec.notes)
EMA_INIT_SHARE = 0.1


@dataclass
class DataSpec:
    name: str = field("shapes", choices=DATASETS, help="see `dimr-lab components dataset`")
    image_size: int = field(0, min=0, max=8192, help="side of the (pixel or latent) image the network sees; "
                                                     "0 = the model's image_size")
    num_classes: int = field(0, min=0, help="0: the dataset's own class count")
    train_size: int = field(4096, min=1, max=10_000_000, help="procedural datasets: number of training images")
    shape_size: list[float] = field(default_factory=lambda: [0.38, 0.48],
                                    help="shapes: [min, max] radius as a fraction of the side (0 < min <= max <= 0.5)")
    shape_palette: str = field("contrast", choices=("contrast", "random"),
                               help="shapes: 'contrast' = a light shape on a dark ground (the class mean is its "
                                    "silhouette); 'random' = two random colours (only the outline tells the class)")
    shape_jitter: float = field(0.2, min=0.0, max=1.0,
                                help="shapes: share of the free room the centre moves in (0: centred, 1: anywhere)")
    texture: str = field("none", choices=("none", "stripes"),
                         help="shapes: 'stripes' fills each shape with fine stripes whose angle depends on the "
                              "class (a detail finer than a patch)")
    texture_period: float = field(3.0, min=2.0, max=64.0, help="shapes: stripe period in pixels")
    root: str = field("", help="folder / latents: the directory to read")
    vae: str = field("", help="latents: the diffusers AutoencoderKL folder that encoded them (decodes samples)")
    flip: bool = field(True, help="pixel datasets: random horizontal flips of the training images (latents "
                                  "datasets do not read it: prepare-latents bakes each image's flip in)")
    num_workers: int = field(0, min=0, max=256)


@dataclass
class DiffusionSpec:
    schedule: str = field("scaled_linear", choices=SCHEDULES)
    num_steps: int = field(1000, min=2, max=1_000_000, help="discrete schedules: number of steps N")
    beta_min: float = field(0.1, min=0.0, max=MAX_BETA, help="vp_linear: beta(0)")
    beta_max: float = field(20.0, min=0.0, max=MAX_BETA, help="vp_linear: beta(1)")
    time_input: str = field("discrete", choices=TIME_INPUTS, help="what the network is given as time")
    prediction: str = field("eps", choices=("eps",))
    multiscale_loss: bool = field(True, help="loss on every branch (DiMR), else the last branch only")
    loss_weights: list[float] = field(default_factory=list, min=0.0,
                                      help="per-branch weights, lowest resolution first; [] = 4^-(K-1-k)")
    label_drop: float = field(0.1, min=0.0, max=1.0, help="probability of the null label in training")


@dataclass
class TrainSpec:
    steps: int = field(1000, min=0, max=100_000_000)
    batch_size: int = field(64, min=1, max=1_000_000, help="global batch, split over processes")
    lr: float = field(2e-4, min=0.0, max=10.0)
    lr_schedule: str = field("constant", choices=LR_SCHEDULES)
    lr_min: float = field(0.0, min=0.0, max=10.0, help="cosine: the learning rate at train.steps (at most train.lr)")
    betas: list[float] = field(default_factory=lambda: [0.99, 0.99], min=0.0, max=0.999999)
    weight_decay: float = field(0.03, min=0.0, max=10.0)
    no_decay: str = field("td_norms_biases", choices=("td_norms_biases", "td_only", "none"),
                          help="parameters without weight decay: TD w/b, norms and biases; TD w/b only (the "
                               "released DiMR code); or none (U-ViT decays every parameter)")
    warmup_steps: int = field(5000, min=0)
    ema_decay: float = field(0.9999, min=0.0, max=1.0)
    ema_warmup: bool = field(False, help="decay at update n is min(ema_decay, (1 + n) / (10 + n)), so the "
                                         "random initial weights leave the average early (TensorFlow's rule)")
    grad_clip: float = field(0.0, min=0.0, help="0 = no clipping")
    precision: str = field("fp32", choices=("fp32", "bf16", "fp16"), help="autocast dtype on GPUs")
    activation_checkpointing: bool = field(False)
    compile: bool = field(False, help="torch.compile of each block (regional compilation: one graph per "
                                      "kind of block; on the CPU it needs a C++ compiler)")
    seed: int = field(0, min=0, max=MAX_SEED)
    init_draws: str = field("stream", choices=INIT_DRAWS,
                            help="how the initial weights are drawn: 'stream' = from the global torch generator "
                                 "seeded train.seed, in construction order (a module one variant adds shifts "
                                 "every later draw); 'by_name' = each random tensor from its own generator keyed "
                                 "by (train.seed, its parameter name), so variants of one seed share the initial "
                                 "values of every tensor they have alike, and the noise stream repeats none of them")
    checkpoint_every: int = field(1000, min=1)
    keep_checkpoints: list[int] = field(default_factory=list, min=1,
                                        help="steps whose checkpoints are kept (for evaluations along training)")
    keep_every: int = field(0, min=0, help="also keep every N-th step's checkpoint (0 = none)")
    log_every: int = field(50, min=1)
    threads: int = field(0, min=0, max=1024, help="CPU threads of this run (0 = OMP_NUM_THREADS where set, as "
                                                  "torchrun and `run --jobs` set it; else every free core)")
    time_limit_s: float = field(0.0, min=0.0, help="wall time of one job (train, run, run --eval-only; 0 = none): "
                                                   "training stops at a checkpoint, an evaluation between its "
                                                   "sample chunks (kept; the next job resumes both); `dimr-lab "
                                                   "eval` is not bounded by it")

    def validate(self) -> None:
        if len(self.betas) != 2:
            raise SpecError(f"must be [beta1, beta2], got {self.betas!r}", key="betas")
        if "train.lr_min" in LR_SCHEDULES.entry(self.lr_schedule).keys and self.lr_min > self.lr:
            # a decay to a larger rate would raise the rate over training, to a divergence for large values
            raise SpecError(f"must be at most train.lr ({self.lr}), got {self.lr_min!r}", key="lr_min")


@dataclass
class SampleSpec:
    sampler: str = field("dpm_solver++", choices=SAMPLERS)
    steps: int = field(25, min=1, max=10_000, help="number of model evaluations per sample (x2 with guidance)")
    order: int = field(2, min=1, max=3, help="DPM-Solver order")
    skip_type: str = field("time_uniform", choices=SKIP_TYPES, help="DPM-Solver++ time grid: uniform in t or "
                                                                      "in log-SNR")
    t_end: float = field(1e-3, min=0.0, max=1.0)
    guidance_scale: float = field(0.0, min=-100.0, max=100.0, help="U-ViT form: eps_c + s (eps_c - eps_u); 0 = none")
    guidance_form: str = field("uvit", choices=("uvit", "dit"))
    guidance_schedule: str = field("constant", choices=("constant", "power_cosine"),
                                   help="how the guidance scale varies with t: 'constant', or the released "
                                        "'power_cosine' ramp (unguided sampling does not read it)")
    guidance_power: float = field(1.0, min=0.0, max=100.0, help="exponent p of the 'power_cosine' guidance "
                                                                "schedule (> 0; the 'constant' one does not read it)")
    use_ema: bool = field(True)
    grid_size: int = field(64, min=1, max=4096)
    seed: int = field(0, min=0, max=MAX_SEED)

    def validate(self) -> None:
        if not 0.0 < self.t_end < 1.0:
            raise SpecError(f"must lie in (0, 1), got {self.t_end!r}", key="t_end")


@dataclass
class EvalSpec:
    enabled: bool = field(True)
    samples: int = field(1000, min=1, max=10_000_000)
    batch_size: int = field(250, min=1, max=100_000)
    compile: bool = field(False, help="torch.compile each block of the sampling network (regional, as "
                                      "train.compile); samples agree with eager ones within float rounding")
    labels: str = field("balanced", choices=LABEL_RULES,
                        help="labels of the evaluated samples: 'balanced' (sample i asks for class i mod K) or "
                             "'frequency' (i.i.d. in proportion to the training set's class counts, as U-ViT's "
                             "ImageNet evaluation draws them)")
    steps: list[int] = field(default_factory=list, min=1,
                             help="also evaluate these training steps (learning curves); the last step always")
    feature_extractor: str = field("classifier", choices=EXTRACTORS)
    inception_weights: str = field("", help="path to torch-fidelity's inception weights (no download)")
    reference_stats: str = field("", help="ADM reference batch (.npz with mu/sigma) for paper-grade FID")
    reference_samples: int = field(0, min=0, max=10_000_000,
                                   help="real images for the reference statistics; 0 = eval.samples (read by the "
                                        "metrics that compare with real images: kid, prc, fid_floor and fid "
                                        "without eval.reference_stats)")
    metrics: list[str] = field(default_factory=lambda: ["fid", "kid", "isc", "prc", "sample_accuracy",
                                                        "distortion_rate"], choices=METRICS)
    classifier: bool = field(True, help="train and use the dataset's classifier (sample accuracy, distortion, "
                                        "classifier features); folder datasets train it on a bounded subsample")
    classifier_images: int = field(20000, min=64, help="at most this many training images for the classifier")
    distortion_threshold: float = field(0.5, min=0.0, max=1.0,
                                        help="a sample is low-fidelity when p(its class) is below this")
    kid_subset_size: int = field(100, min=2, help="KID's subset size (at most the sample and reference counts); "
                                                  "read only with 'kid' in eval.metrics")


@dataclass
class TrackSpec:
    tensorboard: bool = field(False, help="TensorBoard event files in <run>/tensorboard")
    wandb: bool = field(False, help="a wandb run (offline unless wandb_mode = 'online')")
    wandb_project: str = field("dimr-lab")
    wandb_mode: str = field("offline", choices=("offline", "online", "disabled"))

    def validate(self) -> None:
        # wandb's own rules for a project name, checked where the spec is read: wandb refuses the name only
        # once the run has been claimed and its network built, with a traceback
        bad = sorted(set(self.wandb_project) & set("/\\#?%:"))
        if not self.wandb_project or len(self.wandb_project) > 128 or bad:
            raise SpecError(f"a wandb project name: 1 to 128 characters, none of / \\ # ? % : "
                            f"(got {self.wandb_project!r})", key="wandb_project")


# keys that leave the trained weights as they are: not part of a run's identity
OUTSIDE_IDENTITY = {
    "data": ("num_workers",),
    "train": ("checkpoint_every", "keep_checkpoints", "keep_every", "log_every", "threads", "time_limit_s"),
}
# keys added after runs were committed: part of a run's identity only when set to another value than this,
# so every run trained before the key existed keeps its identity (and its folder)
IDENTITY_IF_NOT = {"train": {"init_draws": "stream"}}
# keys that do not change an evaluation's samples or metrics: not part of its name
# (eval.compile and eval.batch_size change samples by float rounding only, as the device does)
OUTSIDE_EVAL_IDENTITY = {"eval": ("enabled", "batch_size", "compile", "steps"), "sample": ("grid_size",)}


@dataclass
class RunSpec:
    model: ModelSpec = field(default_factory=lambda: resolve_model({"preset": "dimr_tiny_3r"}), parser=parse_model)
    data: DataSpec = field(default_factory=DataSpec)
    diffusion: DiffusionSpec = field(default_factory=DiffusionSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    sample: SampleSpec = field(default_factory=SampleSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    track: TrackSpec = field(default_factory=TrackSpec)

    # -------------------------------------------------------------------------------------- checks

    def validate(self) -> None:
        """Every check that needs neither torch nor files: the sections against each other."""
        m, d, diff, tr, s, ev = self.model, self.data, self.diffusion, self.train, self.sample, self.eval
        lo_hi = d.shape_size
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 0.5:
            raise SpecError(f"must be [min, max] with 0 < min <= max <= 0.5, got {lo_hi!r}", key="data.shape_size")
        if d.image_size and m.image_size != d.image_size:
            raise SpecError(f"the network takes {m.image_size}x{m.image_size} inputs (model.image_size) but "
                            f"data.image_size is {d.image_size}: set both", key="data.image_size")
        if m.out_channels and m.out_channels != m.in_channels:
            raise SpecError(f"is {m.out_channels}; training predicts the noise, with model.in_channels = "
                            f"{m.in_channels} channels (0 or {m.in_channels}; a learned variance, as DiT's 2x, is "
                            f"for `describe` and `bench` only)", key="model.out_channels")
        data = DATASETS.entry(d.name)
        if data["kind"] == "pixels" and m.in_channels != data["channels"]:
            raise SpecError(f"dataset {d.name!r} has {data['channels']} channels but model.in_channels is "
                            f"{m.in_channels}", key="model.in_channels")
        if data["kind"] == "latents" and d.image_size == 0 and m.image_size == 0:
            raise SpecError("set the latent size", key="data.image_size")
        classes = d.num_classes or data["classes"]
        if data["classes"] and d.num_classes > data["classes"]:
            raise SpecError(f"dataset {d.name!r} has {data['classes']} classes, got {d.num_classes}",
                            key="data.num_classes")
        if data["classes"] and not data["procedural"] and d.num_classes not in (0, data["classes"]):
            raise SpecError(f"dataset {d.name!r} has {data['classes']} classes, got {d.num_classes} (use 0 or "
                            f"{data['classes']}; only procedural datasets make fewer)", key="data.num_classes")
        if classes and classes > m.num_classes:
            raise SpecError(f"the data has {classes} classes but the network has label rows for "
                            f"{m.num_classes} (model.num_classes)", key="model.num_classes")
        if data["procedural"] and tr.batch_size > d.train_size:
            raise SpecError(f"train.batch_size {tr.batch_size} is larger than the dataset "
                            f"(data.train_size = {d.train_size})", key="train.batch_size")
        if d.name != "shapes" and d.texture != "none":
            raise SpecError("texture is an option of the shapes dataset", key="data.texture")
        if diff.loss_weights and len(diff.loss_weights) != len(m.branches):
            raise SpecError(f"has {len(diff.loss_weights)} entries, the network has {len(m.branches)} branches",
                            key="diffusion.loss_weights")
        if SCHEDULES.meta(diff.schedule, "continuous") and diff.beta_max <= diff.beta_min:
            raise SpecError(f"must be larger than diffusion.beta_min ({diff.beta_min})", key="diffusion.beta_max")
        if SAMPLERS.meta(s.sampler, "needs_discrete") and SCHEDULES.meta(diff.schedule, "continuous"):
            raise SpecError(f"sampler {s.sampler!r} needs a discrete schedule; diffusion.schedule is "
                            f"{diff.schedule!r}", key="sample.sampler")
        if s.skip_type != SampleSpec.__dataclass_fields__["skip_type"].default \
                and "sample.skip_type" not in SAMPLERS.entry(s.sampler).keys:
            # a setting the sampler never reads would name a new evaluation of the same samples
            raise SpecError(f"sampler {s.sampler!r} does not read sample.skip_type (its time grid is its own; "
                            f"`dimr-lab components sampler` lists what each reads)", key="sample.skip_type")
        if SAMPLERS.meta(s.sampler, "needs_discrete") and not SCHEDULES.meta(diff.schedule, "continuous"):
            # the sampler walks distinct integer steps from N down to round(t_end N) (samplers.ddim_steps): found
            # now, not when the samples are made after training or with an evaluation folder already written
            fit = diff.num_steps - round(s.t_end * diff.num_steps)
            if s.steps > fit:
                raise SpecError(f"sampler {s.sampler!r} takes distinct integer steps of the {diff.num_steps}-step "
                                f"schedule from t = 1 to t_end = {s.t_end}: at most {fit}, got {s.steps}",
                                key="sample.steps")
        if not s.guidance_power > 0:  # the ramp's exponent: (1 - t)^0 would be 1 at every t
            raise SpecError(f"must be > 0, got {s.guidance_power!r}", key="sample.guidance_power")
        orders = SAMPLERS.meta(s.sampler, "orders")
        if s.order not in orders:
            raise SpecError(f"sampler {s.sampler!r} takes orders {', '.join(map(str, orders))}, got {s.order}",
                            key="sample.order")
        guided = s.guidance_scale != (0.0 if s.guidance_form == "uvit" else 1.0)
        if guided and diff.label_drop == 0:
            raise SpecError(f"guidance (scale {s.guidance_scale}) needs the null label, which is never trained "
                            f"with diffusion.label_drop = 0", key="sample.guidance_scale")
        if guided and m.num_classes == 0:
            # every sample would ask for the null label: eps_c = eps_u, a no-op at twice the network calls
            raise SpecError(f"guidance (scale {s.guidance_scale}) needs class labels; the network has none "
                            f"(model.num_classes = 0)", key="sample.guidance_scale")
        for i, step in enumerate(ev.steps):
            if step > tr.steps:
                raise SpecError(f"step {step} is beyond train.steps = {tr.steps}", key=f"eval.steps[{i}]")
        self._validate_eval(data)

    def _validate_eval(self, data: Any) -> None:
        ev = self.eval
        classifier_ok = data["classifier"] and ev.classifier
        if ev.feature_extractor == "classifier" and not classifier_ok:
            why = f"dataset {self.data.name!r} has no image classifier" if not data["classifier"] else \
                "eval.classifier is false"
            raise SpecError(f"'classifier' needs the dataset classifier ({why}); use 'inception-v3-compat'",
                            key="eval.feature_extractor")
        if ev.reference_stats and ev.feature_extractor != "inception-v3-compat":
            raise SpecError("holds Inception statistics: set eval.feature_extractor = 'inception-v3-compat'",
                            key="eval.reference_stats")
        for i, name in enumerate(ev.metrics):
            if METRICS.meta(name, "needs_classifier") and not classifier_ok:
                raise SpecError(f"{name!r} needs the dataset classifier, which "
                                + ("this dataset has not" if not data["classifier"] else "eval.classifier switches off"),
                                key=f"eval.metrics[{i}]")
        if ev.labels == "frequency" and data["kind"] == "latents":  # found before training, not at its end
            raise SpecError(f"'frequency' draws labels in proportion to the training set's class counts, which a "
                            f"{self.data.name!r} dataset does not list (each file holds its label); use 'balanced'",
                            key="eval.labels")
        if len(set(ev.metrics)) != len(ev.metrics):
            raise SpecError(f"duplicate metrics in {ev.metrics}", key="eval.metrics")
        # what each metric needs of the sample count (an evaluation that cannot compute one would fail only
        # after all its samples were made): FID a covariance, precision/recall k = 3 neighbours and the sample
        least = {"fid": 2, "fid_floor": 2, "prc": 4}
        short = [m for m in ev.metrics if ev.enabled and ev.samples < least.get(m, 0)]
        if short:
            raise SpecError(f"{ev.samples} samples are too few for {', '.join(short)} (at least "
                            f"{max(least[m] for m in short)})", key="eval.samples")
        if "fid_floor" in ev.metrics and ev.reference_stats:
            raise SpecError("fid_floor compares real images of the local test split, while FID here is against "
                            "eval.reference_stats: the floor would belong to another reference; leave it out",
                            key="eval.metrics")
        if "fid_floor" in ev.metrics and ev.reference_samples not in (0, ev.samples):
            raise SpecError(f"fid_floor is measured at the reference's count, {ev.reference_samples}, not at the "
                            f"{ev.samples} samples FID uses; set eval.reference_samples = 0 (= eval.samples)",
                            key="eval.reference_samples")

    def notes(self) -> list[str]:
        """Advice about a spec that is valid but likely not what was meant (said before training, never refused)."""
        tr, out = self.train, []
        if self.sample.use_ema and not tr.ema_warmup and tr.ema_decay > 0:
            for step in self.eval_steps():
                share = tr.ema_decay ** step  # what the EMA still holds of the initial weights after `step` updates
                if step and share >= EMA_INIT_SHARE:
                    span = f"averages over about {1 / (1 - tr.ema_decay):.0f} steps" if tr.ema_decay < 1 else \
                        "never moves"
                    out.append(f"train.ema_decay = {tr.ema_decay} {span}: at step {step} the EMA weights that sampling "
                               f"uses (sample.use_ema) still hold {share:.0%} of the random initial weights; set "
                               f"train.ema_warmup = true, a larger train.steps, or sample.use_ema = false")
                    break
        return out

    def resolve(self) -> "RunSpec":
        """A copy with data.image_size following the model (the one default the sections share)."""
        out = copy.deepcopy(self)
        if not out.data.image_size:
            out.data.image_size = out.model.image_size
        return out

    # ------------------------------------------------------------------------------------ identity

    def identity(self) -> dict[str, Any]:
        """What the run trains (names its folder; a different identity is a different run)."""
        data = to_dict(self)
        out = {k: data[k] for k in ("model", "data", "diffusion", "train")}
        for section, keys in OUTSIDE_IDENTITY.items():
            out[section] = {k: v for k, v in out[section].items() if k not in keys}
        for section, defaults in IDENTITY_IF_NOT.items():
            for k, default in defaults.items():
                if out[section].get(k) == default:
                    out[section].pop(k)
        if not LR_SCHEDULES.meta(self.train.lr_schedule, "uses_total"):
            out["train"].pop("steps")
        return out

    def identity_hash(self) -> str:
        return stable_hash(self.identity())

    def eval_identity(self) -> dict[str, Any]:
        """The sampling and evaluation settings that name an evaluation (its samples and metrics)."""
        data = to_dict(self)
        out = {k: dict(data[k]) for k in ("sample", "eval")}
        for section, keys in OUTSIDE_EVAL_IDENTITY.items():
            for k in keys:
                out[section].pop(k)
        return out

    def eval_hash(self) -> str:
        return stable_hash(self.eval_identity())

    def eval_steps(self) -> list[int]:
        """The training steps this spec evaluates: eval.steps and the last one, increasing."""
        return sorted({*self.eval.steps, self.train.steps})

    def first_checkpoint_step(self) -> int:
        """The step of a run's first checkpoint: checkpoint_every, a kept step or the last, whichever comes first."""
        return min([self.train.checkpoint_every, self.train.steps, *(s for s in self.kept_steps() if s >= 1)])

    def kept_steps(self) -> list[int]:
        """Steps whose checkpoints are kept: train.keep_checkpoints, eval.steps, multiples of keep_every."""
        tr = self.train
        steps = set(tr.keep_checkpoints) | set(self.eval.steps)
        if tr.keep_every:
            steps |= set(range(tr.keep_every, tr.steps + 1, tr.keep_every))
        return sorted(steps)


def stable_hash(data: Any, n: int = 8) -> str:
    """A short hash of plain data (sorted keys): stable across runs, machines and versions."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def spec_hash(spec: RunSpec) -> str:
    """The hash of a run's identity: the last part of its folder name."""
    return spec.identity_hash()


def load_run_spec(data: dict[str, Any] | str | Path | None = None, overrides: list[tuple[str, Any]] | None = None,
                  *, file: str | None = None, overrides_source: str = "--set") -> RunSpec:
    """Validate a run spec from a dict or a TOML path (None: the built-in default), then with dotted
    overrides on top: a problem in the spec names its file, one the overrides bring in names `--set`."""
    if data is None:
        from dimr_lab.spec.defaults import DEFAULT_RUN

        data, file = copy.deepcopy(DEFAULT_RUN), file or "<built-in default>"
    elif isinstance(data, (str, Path)):
        file = file or str(data)
        data = load_toml(data)
        if "ablation" in data or "variant" in data:  # a newcomer's mix-up: say which command takes the file
            raise SpecError("an ablation file, not a run spec: run it with `dimr-lab run FILE`", file=file)
    elif overrides:  # set_dotted writes into it; without overrides it is only read (resolve() copies the result)
        data = copy.deepcopy(data)
    spec = from_dict(RunSpec, data, file=file)
    if overrides:
        for key, value in overrides:
            if key.startswith("model.") and isinstance(data.get("model"), str):
                data["model"] = {"preset": data["model"]}  # `model = "<preset>"`: a table to set keys in
            set_dotted(data, key, value, file=overrides_source)
        spec = from_dict(RunSpec, data, file=overrides_source)
    return spec.resolve()


def with_overrides(spec: RunSpec, overrides: list[tuple[str, Any]], *, source: str = "--set") -> RunSpec:
    """A resolved spec with dotted overrides applied (errors name `source`)."""
    data = to_dict(spec)
    for key, value in overrides:
        set_dotted(data, key, value, file=source)
    return from_dict(RunSpec, data, file=source).resolve()
