"""A small per-dataset CNN classifier: FID/KID/PRC features, IS logits and the distortion detector."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dimr_lab.errors import UserError

FORMAT = "dimr-lab classifier 1"
FEATURE_DIM = 128
MAX_RESOLUTION = 64  # larger images are resized down: class identity survives, training stays cheap
TIME_LIMIT_S = 60.0


class SmallCNN(nn.Module):
    """Three conv stages, global pooling, one hidden layer (the penultimate features), class logits."""

    def __init__(self, num_classes: int, resolution: int, width: int = 16):
        super().__init__()
        self.num_classes, self.resolution, self.width = num_classes, resolution, width
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.hidden = nn.Sequential(nn.Linear(4 * w, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in [-1, 1] (N, 1|3, H, W) -> (N, 3, R, R) at the classifier's resolution."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey datasets: the classifier is always RGB
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate features (N, 128), logits (N, K)) of images in [-1, 1]."""
        h = self.hidden(self.body(self.prepare(x)))  # (N, 128)
        return h, self.head(h)  # (N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[1]

    @torch.no_grad()
    def predict_proba(self, images_uint8: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Softmax probabilities (N, K) of uint8 images (N, C, H, W)."""
        self.eval()
        device = next(self.parameters()).device
        out = [self(b.to(device).float() / 127.5 - 1).softmax(-1).cpu() for b in images_uint8.split(batch_size)]
        return torch.cat(out)  # (N, K)


def classifier_identity(data_spec, seed: int = 0) -> dict:
    """The dataset identity plus the recipe version: any change makes a new cache file."""
    from dimr_lab.data import dataset_identity

    return {**dataset_identity(data_spec, seed), "recipe": FORMAT}


def cache_path(data_spec, cache_dir: str | Path, seed: int = 0) -> Path:
    """classifier-<name>-<size>-<hash of the identity>.pt under cache_dir."""
    ident = classifier_identity(data_spec, seed)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir).expanduser() / f"classifier-{data_spec.name}-{data_spec.image_size}-{digest}.pt"


def load_classifier_file(path: str | Path, expect_identity: dict | None = None) -> SmallCNN:
    """A classifier from its cache file (weights_only); UserError on anything unexpected."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT!r} file")
        cfg = blob["config"]
        model = SmallCNN(int(cfg["num_classes"]), int(cfg["resolution"]), int(cfg["width"]))
        model.load_state_dict(blob["state_dict"])
    except Exception as err:  # truncated, foreign or mismatched files all land here
        first = (str(err).strip().splitlines() or [""])[0]
        if "Weights only load failed" in first or isinstance(err, (EOFError, pickle.UnpicklingError)):
            first = "not a complete torch file loadable with weights_only=True"  # torch's own text spans a page
        raise UserError(f"{path}: unusable classifier cache ({type(err).__name__}: {first[:200]})") from err
    identity = json.loads(blob.get("identity", "{}"))
    if expect_identity is not None and identity != expect_identity:
        raise UserError(f"{path}: classifier cache belongs to another dataset ({identity})")
    model.identity, model.path = identity, Path(path)
    model.accuracy = float(blob.get("accuracy", float("nan")))
    model.train_seconds = float(blob.get("train_seconds", float("nan")))
    model.requires_grad_(False).eval()
    return model


def _as_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (N, C, H, W) float in [-1, 1] and labels (N,) of a dataset, unflipped."""
    if hasattr(dataset, "images"):  # in-memory uint8 datasets: skip the per-item path
        return dataset.images.float() / 127.5 - 1, dataset.labels.clone()
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.tensor(ys)


def train_classifier(data_spec, seed: int = 0, *, min_steps: int = 256, time_limit_s: float = TIME_LIMIT_S,
                     log=None) -> SmallCNN:
    """Train a SmallCNN on the train split (seeded), measure held-out accuracy on the test split."""
    from dataclasses import replace

    from dimr_lab.data import build_dataset

    if data_spec.name == "latents":
        raise UserError("the classifier needs images: a 'latents' dataset has none (use inception-v3-compat)")
    spec = replace(data_spec, flip=False)
    train = build_dataset(spec, split="train", seed=seed)
    test = build_dataset(replace(spec, train_size=min(spec.train_size, 1024)), split="test", seed=seed)
    x, y = _as_tensors(train)  # (N, C, H, W), (N,)
    xt, yt = _as_tensors(test)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(train.num_classes, min(train.image_size, MAX_RESOLUTION))
        x = model.prepare(x)  # resize once, not every epoch
        xt = model.prepare(xt)
        batch = 128
        per_epoch = (len(y) + batch - 1) // batch
        epochs = max(4, -(-min_steps // per_epoch))  # small datasets get more epochs, not fewer steps
        steps = epochs * per_epoch
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
        model.train()
        step = 0
        for epoch in range(epochs):
            order = torch.randperm(len(y))
            for i in range(0, len(y), batch):
                idx = order[i:i + batch]
                xb = x[idx]  # (B, 3, R, R)
                flip = torch.rand(len(idx)) < 0.5  # flips: a free augmentation, no class is chiral
                xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
                loss = F.cross_entropy(model(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step < steps - 1:
                    sched.step()
                step += 1
            if log:
                log(f"classifier epoch {epoch + 1}/{epochs} loss {loss.item():.3f}")
            if time.perf_counter() - start > time_limit_s:
                break
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model.features(b)[1].argmax(-1) for b in xt.split(512)])
    model.accuracy = float((pred == yt).float().mean())
    model.train_seconds = time.perf_counter() - start
    model.requires_grad_(False)
    return model


def _save(model: SmallCNN, identity: dict, path: Path) -> None:
    """Atomic write: a killed process leaves the old file or none, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": FORMAT, "identity": json.dumps(identity, sort_keys=True),
        "config": {"num_classes": model.num_classes, "resolution": model.resolution, "width": model.width},
        "state_dict": model.state_dict(), "accuracy": model.accuracy, "train_seconds": model.train_seconds,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def get_classifier(data_spec, cache_dir: str | Path, *, seed: int = 0, log=None) -> SmallCNN:
    """The dataset's classifier: loaded from cache_dir, or trained once and cached; a bad cache is rebuilt."""
    path = cache_path(data_spec, cache_dir, seed)
    identity = classifier_identity(data_spec, seed)
    if path.exists():
        try:
            return load_classifier_file(path, identity)
        except UserError as err:
            warnings.warn(f"{err}; retraining it", stacklevel=2)
    model = train_classifier(data_spec, seed, log=log)
    _save(model, identity, path)
    model.identity, model.path = identity, path
    return model
