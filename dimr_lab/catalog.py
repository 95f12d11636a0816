"""The built-in components: one line each, by kind (torch-free: targets are imported when built).

Adding a component is its module plus one line here; the spec layer takes the allowed names, and the
facts it checks (a norm's `condition`, a dataset's channels, ...), from these lines.
"""

from __future__ import annotations

from dimr_lab.registry import (ATTENTION, BLOCKS, CASCADES, CONDITIONING, DATASETS, EXTRACTORS, HEADS,
                               LR_SCHEDULES, METRICS, MLPS, NORMS, POS_EMBEDS, SAMPLERS, SCHEDULES, TIME_INPUTS)

# ------------------------------------------------------------------------------------- the network
NORMS.add("layernorm", "dimr_lab.nn.norms:LayerNorm", "LayerNorm with learned scale and shift (U-ViT)")
NORMS.add("rmsnorm", "dimr_lab.nn.norms:RMSNorm", "RMSNorm with a learned scale")
NORMS.add("tdln", "dimr_lab.nn.norms:TDLayerNorm",
          "time-dependent LayerNorm (DiMR): LN(x) * gamma(t) + beta(t), 8d parameters", condition="time")
NORMS.add("tdrmsnorm", "dimr_lab.nn.norms:TDRMSNorm",
          "time-dependent RMSNorm (DiMR's blocks): x / rms(x) * gamma(t), 4d parameters", condition="time")
NORMS.add("adaln", "dimr_lab.nn.norms:AdaLN",
          "adaptive LayerNorm: shift and scale regressed from time+class (DiT without gates)",
          keys=("model.time_embed_dim",), condition="vector")
NORMS.add("adaln_zero", "dimr_lab.nn.norms:AdaLNZero",
          "adaLN-Zero (DiT): shift, scale and a zero-initialised residual gate per norm",
          keys=("model.time_embed_dim",), condition="vector", gated=True)

CONDITIONING.add("norm", "dimr_lab.nn.conditioning:NormConditioning",
                 "DiMR: time only through time-dependent norms; class as a token in attention branches")
CONDITIONING.add("token", "dimr_lab.nn.conditioning:TokenConditioning",
                 "U-ViT: time and class as tokens in attention branches (sinusoidal time code)")
CONDITIONING.add("adaln", "dimr_lab.nn.conditioning:AdaLNConditioning",
                 "DiT: an MLP time embedding plus a class embedding, read by adaLN norms",
                 keys=("model.time_embed_dim",), vector=True)

BLOCKS.add("transformer", "dimr_lab.nn.blocks:TransformerBlock",
           "x += Attn(Norm(x)); x += MLP(Norm(x)): global attention, usable in any branch (a high-resolution "
           "one too)", keys=("model.branches.N.heads", "model.attention", "model.attention_fp32", "model.qkv_bias"),
           uses_attention=True)
BLOCKS.add("convnext", "dimr_lab.nn.blocks:ConvNeXtBlock",
           "DiMR's ConvNeXt: x += DWConv_kxk(x) (no norm); x += MLP(Norm(x))", keys=("model.branches.N.kernel",))

MLPS.add("mlp", "dimr_lab.nn.layers:MLP", "Linear -> GELU -> Linear (ViT/U-ViT/DiT); hidden 4d by default",
         default_ratio=4)
MLPS.add("glu", "dimr_lab.nn.layers:GLU", "gated: W2(GELU(W0 x) * W1 x) (DiMR); hidden 2d by default",
         default_ratio=2)

ATTENTION.add("sdpa", "dimr_lab.nn.attention:sdpa_attention",
              "torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient / math)")
ATTENTION.add("math", "dimr_lab.nn.attention:math_attention",
              "softmax(q k^T / sqrt(d)) v written out: the reference, slowest")
ATTENTION.add("xformers", "dimr_lab.nn.attention:xformers_attention",
              "xformers memory_efficient_attention on CUDA; elsewhere falls back to sdpa with a warning")

POS_EMBEDS.add("learned", "dimr_lab.nn.layers:LearnedPosEmbed", "a learned table of H*W rows over the patches (DiMR; U-ViT's "
               "also covers its time and class tokens, which get none here)")
POS_EMBEDS.add("sincos", "dimr_lab.nn.layers:SinCosPosEmbed", "fixed 2-D sine-cosine code (DiT), no parameters",
               width_multiple=4)
POS_EMBEDS.add("none", "dimr_lab.nn.layers:NoPosEmbed", "no position code (convolutions see position through "
               "padding)")

CASCADES.add("dimr", "dimr_lab.nn.heads:DiMRCascade",
             "concat the lower branch's input and every block output -> Norm -> Linear -> pixel shuffle -> "
             "Norm, added to the next branch's input (DiMR Sec. 3.2)")
CASCADES.add("none", "dimr_lab.nn.heads:NoCascade", "branches do not share features (each sees only the noisy "
             "input)", uses_features=False)

HEADS.add("conv", "dimr_lab.nn.heads:ConvHead", "Norm -> Conv kxk at the branch's own resolution (DiMR: low "
          "branches predict down-sampled noise)", keys=("model.branches.N.out_kernel",))
HEADS.add("unpatchify", "dimr_lab.nn.heads:UnpatchifyHead",
          "Norm -> Linear to p*p*C -> unpatchify to the input resolution (DiT)", unpatchify=True)
HEADS.add("unpatchify_conv", "dimr_lab.nn.heads:UnpatchifyConvHead", "Norm -> Linear -> unpatchify -> Conv 3x3 "
          "(U-ViT)", keys=("model.branches.N.out_kernel",), unpatchify=True)

# --------------------------------------------------------------------------------------------- data
DATASETS.add("shapes", "dimr_lab.data.shapes:build",
             "procedural shapes (built in): 8 classes of light shapes on dark grounds, any size",
             keys=("data.image_size", "data.num_classes", "data.train_size", "data.shape_size",
                   "data.shape_jitter", "data.shape_palette", "data.texture", "data.texture_period"),
             classes=8, procedural=True)
DATASETS.add("digits", "dimr_lab.data.digits:build", "scikit-learn's 8x8 digits, upscaled (10 classes)",
             keys=("data.image_size",), classes=10)
DATASETS.add("folder", "dimr_lab.data.folder:build",
             "an ImageFolder tree (one folder per class; hidden files and folders left out), centre-cropped",
             keys=("data.root", "data.image_size", "data.num_classes"))
DATASETS.add("latents", "dimr_lab.data.latents:build",
             "pre-extracted VAE latents in the released layout (dimr-lab prepare-latents)",
             keys=("data.root", "data.image_size", "data.num_classes", "data.vae"),
             kind="latents", channels=4, classifier=False)

# -------------------------------------------------------------------------------------------- diffusion
SCHEDULES.add("scaled_linear", "dimr_lab.diffusion.schedule:scaled_linear",
              "Stable Diffusion's discrete betas (the released latent path): linspace(sqrt(0.00085), "
              "sqrt(0.012), N)^2", keys=("diffusion.num_steps",))
SCHEDULES.add("cosine", "dimr_lab.diffusion.schedule:cosine", "Nichol & Dhariwal's discrete cosine betas",
              keys=("diffusion.num_steps",))
SCHEDULES.add("vp_linear", "dimr_lab.diffusion.vp:build",
              "continuous VP SDE, beta(t) from 0.1 to 20, t ~ U[0, 1) (U-ViT's and DiMR's pixel path)",
              keys=("diffusion.beta_min", "diffusion.beta_max"), continuous=True)

TIME_INPUTS.add("discrete", "dimr_lab.diffusion.time_input:discrete",
                "t as the schedule gives it (n/N on a discrete one); TD norms read tau = 2t - 1 (released latent "
                "path: log_snr = 8t - 4, tau = log_snr/4); time tokens embed 1000 t")
TIME_INPUTS.add("vp_logsnr", "dimr_lab.diffusion.time_input:vp_logsnr",
                "released pixel path: TD norms read tau = ln SNR(t) / 4 (DiMR sde.py: its two clamps leave "
                "the SNR in [1e-6, 1e6]); time tokens embed 999 t (U-ViT sde.py ScoreModel)")

SAMPLERS.add("dpm_solver++", "dimr_lab.diffusion.samplers:dpm_solver_pp_multistep",
             "multistep DPM-Solver++ (data prediction), orders 1-3, lower orders at the end below 10 steps",
             keys=("sample.steps", "sample.order", "sample.t_end", "sample.skip_type"))
SAMPLERS.add("dpm_solver++_fast", "dimr_lab.diffusion.samplers:dpm_solver_pp_fast",
             "single-step DPM-Solver++ on a fine grid of NFE points, steps of order 3..3 then 2/1 (DiMR's "
             "released eval)", keys=("sample.steps", "sample.order", "sample.t_end", "sample.skip_type"))
SAMPLERS.add("dpm_solver_fast", "dimr_lab.diffusion.dpm_solver_fast:sampler",
             "DPM-Solver-fast with noise prediction, K = NFE//3+1 steps uniform in log-SNR (U-ViT's pixel "
             "ImageNet-64 eval)", keys=("sample.steps", "sample.order", "sample.t_end"))
SAMPLERS.add("ddim", "dimr_lab.diffusion.samplers:ddim", "DDIM (eta = 0) on integer steps of a discrete schedule",
             keys=("sample.steps", "sample.t_end"), needs_discrete=True, orders=(1,))

LR_SCHEDULES.add("constant", "dimr_lab.train.loop:lr_constant",
                 "linear warm-up from 0, then constant (the released recipes)", keys=("train.warmup_steps",))
LR_SCHEDULES.add("cosine", "dimr_lab.train.loop:lr_cosine",
                 "linear warm-up, then cosine decay to train.lr_min at train.steps",
                 keys=("train.warmup_steps", "train.lr_min", "train.steps"), uses_total=True)

# ------------------------------------------------------------------------------------------- evaluation
EXTRACTORS.add("classifier", "dimr_lab.eval.extractors:classifier",
               "the dataset's own small classifier (trained once, cached; no download): classifier-FID etc.")
EXTRACTORS.add("inception-v3-compat", "dimr_lab.eval.extractors:inception",
               "torch-fidelity's Inception-v3 (paper-grade FID/IS) from a local weights file",
               keys=("eval.inception_weights", "eval.reference_stats"))

METRICS.add("fid", "dimr_lab.eval.metrics:FID", "Frechet distance of features (against real images or stored "
            "reference statistics)", needs_real=True)
METRICS.add("kid", "dimr_lab.eval.metrics:KID", "kernel inception distance (unbiased MMD, polynomial kernel)",
            needs_real=True)
METRICS.add("isc", "dimr_lab.eval.metrics:ISC", "inception score of the extractor's logits")
METRICS.add("prc", "dimr_lab.eval.metrics:PRC", "precision and recall of the feature manifolds", needs_real=True)
METRICS.add("sample_accuracy", "dimr_lab.eval.metrics:SampleAccuracy",
            "share of samples the dataset classifier puts in the class asked for", needs_classifier=True)
METRICS.add("distortion_rate", "dimr_lab.eval.metrics:DistortionRate",
            "share of samples whose asked-for class gets p < eval.distortion_threshold (the paper's detector)",
            needs_classifier=True)
METRICS.add("fid_floor", "dimr_lab.eval.metrics:FIDFloor",
            "FID of held-out real images against the reference real images: the evaluation's own floor",
            needs_real=True)
