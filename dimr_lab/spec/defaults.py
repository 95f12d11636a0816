"""The built-in default run: a small DiMR on the procedural shapes dataset, minutes on a laptop CPU."""

DEFAULT_RUN = {
    "model": {"preset": "dimr_tiny_3r"},
    "data": {"name": "shapes", "image_size": 32, "train_size": 4096},
    "diffusion": {"schedule": "scaled_linear", "label_drop": 0.1},
    "train": {"steps": 1500, "batch_size": 64, "lr": 1e-3, "warmup_steps": 100, "ema_decay": 0.999,
              "checkpoint_every": 500, "log_every": 50},
    "sample": {"sampler": "dpm_solver++", "steps": 25, "order": 2, "guidance_scale": 1.0, "grid_size": 64},
    "eval": {"enabled": True, "samples": 512, "feature_extractor": "classifier"},
}
