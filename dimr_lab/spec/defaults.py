"""The built-in default run: a small DiMR on the procedural shapes dataset, minutes on a laptop CPU.

Sized for a 2-core CPU: 16x16 shapes (a 32x32 step costs about 4x more), batch 32, a short-run recipe
(lr 2e-3, betas 0.9/0.99, EMA 0.995: the paper's 0.99/0.99 and EMA 0.9999 are for 1M-step runs).
The shapes are the dataset's defaults: 8 classes, light shapes on a dark ground, large and near the
centre, so that each class's mean image is its silhouette and the label matters to the denoiser at
every noise level; with two random colours instead (`data.shape_palette = "random"`) every class has
the same mean image and a network this small learns the look of the data long before it follows the
label (see README). Classifier-free guidance at 3 (U-ViT form) sharpens the class.
"""

DEFAULT_RUN = {
    "model": {"preset": "dimr_tiny_3r"},
    "data": {"name": "shapes", "train_size": 4096},
    "diffusion": {"schedule": "scaled_linear", "label_drop": 0.1},
    "train": {"steps": 1800, "batch_size": 32, "lr": 2e-3, "betas": [0.9, 0.99], "warmup_steps": 50,
              "ema_decay": 0.995, "checkpoint_every": 600, "log_every": 50},
    "sample": {"sampler": "dpm_solver++", "steps": 15, "order": 2, "guidance_scale": 3.0, "grid_size": 64},
    "eval": {"enabled": True, "samples": 256, "feature_extractor": "classifier"},
}
