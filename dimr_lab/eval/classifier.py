"""A small per-dataset CNN classifier: FID/KID/PRC features, IS logits and the distortion detector."""

from __future__ import annotations

import fcntl
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


def weights_digest(model: nn.Module) -> str:
    """12 hex digits of the SHA-256 of the weights (every state-dict tensor's bytes, in order): which classifier
    measured an evaluation. The dataset and recipe name the cache file, but a classifier retrained elsewhere
    (another machine, thread count or time limit) is another instrument, with other features."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def classifier_identity(data_spec, seed: int = 0, max_images: int | None = None) -> dict:
    """The dataset identity plus the recipe version (and the subsample size of datasets read from disk):
    any change makes a new cache file."""
    from dimr_lab.data import dataset_identity
    from dimr_lab.registry import DATASETS

    ident = {**dataset_identity(data_spec, seed), "recipe": FORMAT}
    # the images it trains on: a cap on them changes it wherever the training split is larger than the cap
    if max_images and (not DATASETS.meta(data_spec.name, "procedural") or data_spec.train_size > max_images):
        ident["max_images"] = int(max_images)
    return ident


def cache_path(data_spec, cache_dir: str | Path, seed: int = 0, max_images: int | None = None) -> Path:
    """classifier-<name>-<size>-<hash of the identity>.pt under cache_dir."""
    ident = classifier_identity(data_spec, seed, max_images)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir).expanduser() / f"classifier-{data_spec.name}-{data_spec.image_size}-{digest}.pt"


def load_classifier_file(path: str | Path, expect_identity: dict | None = None) -> SmallCNN:
    """A classifier from its cache file (weights_only); UserError on anything unexpected."""
    from dimr_lab.nn.checkpoint import load_file

    try:
        blob = load_file(path, what="classifier file")
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
    model.identity, model.path, model.digest = identity, Path(path), weights_digest(model)
    model.accuracy = float(blob.get("accuracy", float("nan")))
    model.train_seconds = float(blob.get("train_seconds", float("nan")))
    epochs = blob.get("epochs")
    model.epochs = [int(e) for e in epochs] if isinstance(epochs, list) and len(epochs) == 2 else None  # older files
    model.requires_grad_(False).eval()
    return model


def _as_tensors(dataset, picks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C, H, W) float in [-1, 1] and labels (N,) of a dataset (or of the picked items), unflipped.
    Datasets on disk are read one item at a time (`load_uint8`), never all at once."""
    if hasattr(dataset, "images"):  # in-memory uint8 datasets: skip the per-item path
        images, labels = dataset.images, dataset.labels
        if picks is not None:
            images, labels = images[picks], labels[picks]
        return images.float() / 127.5 - 1, labels.clone()
    picks = torch.arange(len(dataset)) if picks is None else picks
    x = torch.stack([dataset.load_uint8(int(i)) for i in picks])  # (N, C, H, W) uint8
    y = torch.tensor([int(dataset.labels[int(i)]) for i in picks])
    return x.float() / 127.5 - 1, y


def _spread(n_items: int, n: int, offset: float = 0.0) -> torch.Tensor:
    """n indices spread evenly over 0..n_items-1 (every class of a sorted folder), shifted by `offset` of a step."""
    n = min(n, n_items)
    step = n_items / n
    return ((torch.arange(n, dtype=torch.float64) + offset) * step).long().clamp(max=n_items - 1).unique()


def train_classifier(data_spec, seed: int = 0, *, min_steps: int = 256, time_limit_s: float = TIME_LIMIT_S,
                     max_images: int = 20000, log=None) -> SmallCNN:
    """Train a SmallCNN on the train split (seeded), measure held-out accuracy on the test split. A dataset
    read from disk trains on at most `max_images` evenly spread images and is tested on others."""
    from dataclasses import replace

    from dimr_lab.data import build_dataset
    from dimr_lab.registry import DATASETS

    if not DATASETS.meta(data_spec.name, "classifier"):
        raise UserError(f"the classifier needs images: a {data_spec.name!r} dataset has none (use inception-v3-compat)")
    spec = replace(data_spec, flip=False)
    train = build_dataset(spec, split="train", seed=seed)
    if hasattr(train, "images"):
        test = build_dataset(replace(spec, train_size=min(spec.train_size, 1024)), split="test", seed=seed)
        x, y = _as_tensors(train, _spread(len(train), max_images) if len(train) > max_images else None)
        xt, yt = _as_tensors(test)
    else:  # one tree on disk: disjoint spreads for training and testing
        x, y = _as_tensors(train, _spread(len(train), max_images))
        xt, yt = _as_tensors(train, _spread(len(train), min(1024, max(1, len(train) // 10)), offset=0.5))
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator it forks (torch.manual_seed: every CUDA one too)
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
                if log:
                    log(f"classifier: time limit ({time_limit_s:.0f} s) after {epoch + 1} of {epochs} epochs; "
                        f"metrics.json records it (classifier_epochs)")
                break
    model.eval()
    model.epochs = [epoch + 1, epochs]  # trained, planned: fewer trained = stopped by the time limit
    with torch.no_grad():
        pred = torch.cat([model.features(b)[1].argmax(-1) for b in xt.split(512)])
    model.accuracy = float((pred == yt).float().mean())
    model.train_seconds = time.perf_counter() - start
    model.requires_grad_(False)
    return model


def _save(model: SmallCNN, identity: dict, path: Path) -> None:
    """Atomic write: a killed process leaves the old file or none, never half of one."""
    from dimr_lab.nn.checkpoint import save_file

    blob = {
        "format": FORMAT, "identity": json.dumps(identity, sort_keys=True),
        "config": {"num_classes": model.num_classes, "resolution": model.resolution, "width": model.width},
        "state_dict": model.state_dict(), "accuracy": model.accuracy, "train_seconds": model.train_seconds,
        "epochs": list(getattr(model, "epochs", []) or []),
    }
    save_file(blob, path, what="classifier file")


def get_classifier(data_spec, cache_dir: str | Path, *, seed: int = 0, max_images: int = 20000,
                   log=None) -> SmallCNN:
    """The dataset's classifier: loaded from cache_dir, or trained once and cached (one process trains it
    while others wait for the file); a bad cache is rebuilt."""
    path = cache_path(data_spec, cache_dir, seed, max_images)
    identity = classifier_identity(data_spec, seed, max_images)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise UserError(f"{path.parent}: cannot use the classifier cache ({err.strerror or err}); "
                        f"set DIMR_LAB_CACHE to a writable folder") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            try:
                return load_classifier_file(path, identity)
            except UserError as err:
                warnings.warn(f"{err}; retraining it", stacklevel=2)
        if log:
            log(f"training the {data_spec.name} classifier for evaluation (once; cached in {path.parent})")
        model = train_classifier(data_spec, seed, max_images=max_images, log=log)
        _save(model, identity, path)
        model.identity, model.path, model.digest = identity, path, weights_digest(model)
        return model
    finally:
        os.close(lock)
