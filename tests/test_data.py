"""Datasets: shapes, range, labels, determinism, the latents layout and clear errors."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from dimr_lab.data import build_dataset
from dimr_lab.data.folder import center_crop_resize
from dimr_lab.errors import SpecError, UserError
from dimr_lab.spec.run_spec import DataSpec, load_run_spec


def check_items(ds, n=8, channels=3, size=16):
    """Every item is (float (C, S, S) in [-1, 1], int label within num_classes)."""
    assert ds.kind == "pixels" and ds.channels == channels and ds.image_size == size
    for i in range(0, len(ds), max(1, len(ds) // n)):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (channels, size, size)
        assert x.min() >= -1 and x.max() <= 1
        assert isinstance(y, int) and 0 <= y < ds.num_classes


# ---- shapes -------------------------------------------------------------------------------------


def test_shapes_items_balance_and_sharp_edges():
    ds = build_dataset(DataSpec(name="shapes", image_size=16, train_size=800, flip=False))
    check_items(ds)
    assert ds.num_classes == 8 and len(ds) == 800
    assert torch.bincount(ds.labels, minlength=8).tolist() == [100] * 8
    flat = ds.images.reshape(len(ds), 3, -1)  # (N, 3, S*S)
    colours = [len(torch.unique(img.T, dim=0)) for img in flat[:64]]
    assert max(colours) <= 2, "hard masks give exactly a foreground and a background colour"
    assert sum(c == 2 for c in colours) >= 60, "the shape must be visible"
    # values are exact multiples of 1/127.5 (uint8 levels): no anti-aliasing in the float path either
    x, _ = ds[3]
    assert torch.allclose((x + 1) * 127.5, ((x + 1) * 127.5).round(), atol=1e-4)


def test_shapes_deterministic_and_split_streams():
    a = build_dataset(DataSpec(image_size=16, train_size=64), seed=1)
    b = build_dataset(DataSpec(image_size=16, train_size=300), seed=1)
    assert torch.equal(a.images, b.images[:64]), "an image depends on (seed, index) only, not on the size"
    assert not torch.equal(a.images, build_dataset(DataSpec(image_size=16, train_size=64), seed=2).images)
    test = build_dataset(DataSpec(image_size=16, train_size=64), split="test", seed=1)
    assert not torch.equal(a.images, test.images) and torch.equal(a.labels, test.labels)
    # distinct images: the test split is not a copy of train
    same = (a.images.reshape(64, -1)[:, None] == test.images.reshape(64, -1)[None]).all(-1)
    assert not same.any()


def test_stripes_texture_is_finer_than_a_patch_and_set_by_the_class():
    plain = build_dataset(DataSpec(image_size=32, train_size=16))
    striped = build_dataset(DataSpec(image_size=32, train_size=16, texture="stripes", texture_period=3.0))
    differs = (plain.images != striped.images).any(1)  # (N, S, S): only inside the shapes
    assert differs.any() and torch.equal(plain.labels, striped.labels)
    img = striped.images[0].int()  # a circle: stripes at angle 0 are vertical, 3 px apart
    fg_rows = img[:, 16, 10:22]  # a row through the middle of the shape
    changes = (fg_rows[:, 1:] != fg_rows[:, :-1]).any(0).sum()
    assert changes >= 5, "stripes every 1.5 px: many changes across 12 px"
    with pytest.raises(SpecError):
        load_run_spec(None, [("data.name", "digits"), ("data.texture", "stripes")])


def test_shapes_rendered_in_chunks_equal_one_by_one_and_any_resolution():
    from dimr_lab.data.shapes import render_shapes

    ds = build_dataset(DataSpec(image_size=32, train_size=2100))  # three chunks of 1024
    assert ds.images.shape == (2100, 3, 32, 32) and ds.images.dtype == torch.uint8
    picks = np.array([0, 1023, 1024, 2099])  # an image is a function of its index alone
    alone = render_shapes(picks, 32, 8, 0, 0)
    assert torch.equal(ds.images[torch.from_numpy(picks)], alone)
    big = build_dataset(DataSpec(image_size=40, train_size=8, num_classes=4))
    check_items(big, size=40)
    assert big.num_classes == 4 and set(big.labels.tolist()) == {0, 1, 2, 3}


def test_shapes_render_a_bounded_number_of_pixels_at_a_time(monkeypatch):
    """Chunks of 1024 images whatever their side: the renderer's float maps took 3 GiB at side 256. The
    images are the same whatever the chunking (each is a function of its index)."""
    from dimr_lab.data import shapes

    calls = []
    render = shapes.render_shapes
    monkeypatch.setattr(shapes, "render_shapes", lambda idx, s, *a: calls.append((len(idx), s)) or render(idx, s, *a))
    ds = build_dataset(DataSpec(image_size=128, train_size=70))
    assert sum(n for n, _ in calls) == 70 and len(calls) > 1
    assert max(n * s * s for n, s in calls) <= 1024 * 32 * 32
    assert torch.equal(ds.images[[0, 69]], render(np.array([0, 69]), 128, 8, 0, 0))
    calls.clear()
    build_dataset(DataSpec(image_size=32, train_size=1500))
    assert [n for n, _ in calls] == [1024, 476], "at the default side, as many images a chunk as before"


def test_shapes_flip_only_mirrors_train():
    ds = build_dataset(DataSpec(image_size=16, train_size=16, flip=True))
    torch.manual_seed(0)
    seen = set()
    # every shape is left-right symmetric: take one whose centre sits off the middle, so a flip shows
    i = next(j for j in range(16) if not torch.equal(ds.images[j], ds.images[j].flip(-1)))
    for _ in range(20):
        x, _ = ds[i]
        base = ds.images[i].float() / 127.5 - 1
        assert torch.equal(x, base) or torch.equal(x, base.flip(-1))
        seen.add(torch.equal(x, base))
    assert seen == {True, False}
    test = build_dataset(DataSpec(image_size=16, train_size=16, flip=True), split="test")
    assert all(torch.equal(test[5][0], test[5][0]) for _ in range(5)) and not test.flip


def test_shapes_too_many_classes():
    with pytest.raises(SpecError, match="data.num_classes"):
        build_dataset(DataSpec(num_classes=9, train_size=8))


def test_shapes_palette_size_and_jitter():
    """contrast: a light shape on a dark ground, so each class's mean image is its silhouette; jitter 0
    centres every shape; the radius stays inside shape_size."""
    spec = DataSpec(image_size=32, train_size=400, shape_size=[0.3, 0.4], shape_jitter=0.0, flip=False)
    ds = build_dataset(spec)
    img = ds.images.float() / 255  # (N, 3, S, S)
    light = (img >= 0.6 - 1e-6).all(1)  # (N, S, S): the shape's pixels
    dark = (img <= 0.35 + 1e-6).all(1)
    assert bool((light | dark).all()), "every pixel is either the light shape or the dark ground"
    circles = light[ds.labels == 0].float()  # (n, S, S)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    cy = (circles * ys).sum((1, 2)) / circles.sum((1, 2))
    cx = (circles * xs).sum((1, 2)) / circles.sum((1, 2))
    assert torch.allclose(cy, torch.full_like(cy, 15.5), atol=0.6) and torch.allclose(cx, torch.full_like(cx, 15.5), atol=0.6)
    radius = (circles.sum((1, 2)) / torch.pi).sqrt() / 32
    assert radius.min() > 0.3 - 0.03 and radius.max() < 0.4 + 0.03
    # the class means differ: the label tells a denoiser where the light pixels are
    means = torch.stack([light[ds.labels == k].float().mean(0) for k in range(8)])  # (8, S, S)
    gaps = torch.cdist(means.flatten(1), means.flatten(1))
    assert gaps[~torch.eye(8, dtype=torch.bool)].min() > 0.5
    # 'random': both colours anywhere, the light/dark split above no longer holds
    rnd = build_dataset(DataSpec(image_size=32, train_size=64, shape_palette="random")).images.float() / 255
    assert not ((rnd >= 0.6 - 1e-6).all(1) | (rnd <= 0.35 + 1e-6).all(1)).all()
    # jitter 1 spreads centres over the free room
    moved = build_dataset(DataSpec(image_size=32, train_size=400, shape_size=[0.2, 0.2], shape_jitter=1.0))
    lit = ((moved.images.float() / 255) >= 0.6 - 1e-6).all(1)[moved.labels == 0].float()
    spread = ((lit * xs).sum((1, 2)) / lit.sum((1, 2))).std()
    assert spread > 3.0


@pytest.mark.parametrize("key,value", [("data.shape_size", [0.4, 0.3]), ("data.shape_size", [0.0, 0.3]),
                                       ("data.shape_size", [0.3, 0.6]), ("data.shape_size", [0.3]),
                                       ("data.shape_jitter", 1.5), ("data.shape_palette", "neon")])
def test_shapes_options_refused(key, value):
    from dimr_lab.spec.run_spec import load_run_spec

    with pytest.raises(SpecError, match=key.replace(".", r"\.")):
        load_run_spec(None, [(key, value)])


# ---- digits -------------------------------------------------------------------------------------


def test_digits():
    pytest.importorskip("sklearn", reason="digits is an optional extra (scikit-learn)")
    train = build_dataset(DataSpec(name="digits", image_size=16, flip=False), seed=0)
    test = build_dataset(DataSpec(name="digits", image_size=16), split="test", seed=0)
    check_items(train)
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert train.num_classes == 10 and set(test.labels.tolist()) == set(range(10))
    again = build_dataset(DataSpec(name="digits", image_size=16), split="test", seed=0)
    assert torch.equal(test.images, again.images)
    with pytest.raises(SpecError, match="data.num_classes"):
        build_dataset(DataSpec(name="digits", num_classes=5))


# ---- folder -------------------------------------------------------------------------------------


def write_folder(root, sizes=((40, 24), (24, 30), (64, 64)), classes=("cat", "ant")):
    """A tiny ImageFolder tree of PNGs; each image is one flat colour per class plus a marker."""
    from PIL import Image

    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for j, (w, h) in enumerate(sizes):
            arr = np.zeros((h, w, 3), np.uint8)
            arr[..., k] = 200
            Image.fromarray(arr).save(root / name / f"{j}.png")
    return root


def test_folder(tmp_path):
    root = write_folder(tmp_path / "imgs")
    ds = build_dataset(DataSpec(name="folder", root=str(root), image_size=16))
    check_items(ds)
    assert ds.class_names == ["ant", "cat"] and ds.num_classes == 2 and len(ds) == 6
    x, y = ds[0]
    assert y == 0 and torch.allclose(x[1], torch.tensor(200 / 127.5 - 1))  # "ant" was written in channel 1
    with pytest.raises(SpecError, match="data.num_classes"):
        build_dataset(DataSpec(name="folder", root=str(root), num_classes=3))


def test_center_crop_matches_adm_rule():
    from PIL import Image

    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 20:60] = 255  # the central square is white, the side bands black
    out = center_crop_resize(Image.fromarray(arr), 10)  # BOX 80x40 -> 40x20 -> 20x10, then crop
    assert out.shape == (10, 10, 3)
    assert out.min() == 255, "the short side sets the scale and the crop is exactly the central square"
    arr[:, 20:22] = 0
    assert center_crop_resize(Image.fromarray(arr), 10)[:, 0].max() < 255


def test_folder_errors(tmp_path):
    with pytest.raises(SpecError, match="data.root.*nope"):
        build_dataset(DataSpec(name="folder", root=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class folders"):
        build_dataset(DataSpec(name="folder", root=str(tmp_path / "empty")))
    (tmp_path / "empty" / "a").mkdir()
    with pytest.raises(UserError, match="no images"):
        build_dataset(DataSpec(name="folder", root=str(tmp_path / "empty")))
    # a class folder without images beside others was still a class (the network's, the balanced evaluation
    # labels' and the classifier's), of which no real image exists
    root = write_folder(tmp_path / "imgs")
    (root / "dog").mkdir()
    (root / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"imgs/dog: a class folder without images \(\.jpg.*; remove it or add images"):
        build_dataset(DataSpec(name="folder", root=str(root)))
    # a symbolic link to an image that is not there was skipped without a word (one image fewer); a link to an
    # image outside the tree is read as the image
    (root / "dog" / "0.png").symlink_to(root / "cat" / "0.png")
    assert len(build_dataset(DataSpec(name="folder", root=str(root)))) == 7
    (root / "dog" / "1.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(UserError, match=r"dog/1\.png: a symbolic link to '.*gone\.png', which does not exist"):
        build_dataset(DataSpec(name="folder", root=str(root)))
    with pytest.raises(SpecError, match="data.name.*unknown dataset 'shape'.*did you mean 'shapes'"):
        build_dataset(DataSpec(name="shape"))
    with pytest.raises(SpecError, match="split"):
        build_dataset(DataSpec(), split="val")


def test_folder_leaves_out_hidden_files_and_folders(tmp_path):
    """macOS's ._x.jpg resource forks and .ipynb_checkpoints copies carry image suffixes: they were listed as
    images of the class and failed to decode in the middle of training (or counted twice)."""
    root = write_folder(tmp_path / "imgs")
    before = build_dataset(DataSpec(name="folder", root=str(root)))
    (root / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "cat" / ".ipynb_checkpoints").mkdir()
    (root / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png").write_bytes((root / "cat" / "0.png").read_bytes())
    (root / "cat" / "sub").mkdir()
    (root / "cat" / "sub" / "9.png").write_bytes((root / "cat" / "0.png").read_bytes())  # a visible sub-folder counts
    after = build_dataset(DataSpec(name="folder", root=str(root)))
    assert sorted(map(str, after.files)) == sorted([*map(str, before.files), str(root / "cat" / "sub" / "9.png")])
    for i in range(len(after)):
        after.load_uint8(i)


def test_folder_follows_linked_sub_folders_as_it_follows_linked_class_folders(tmp_path):
    """A symbolic link to a folder inside a class folder was not followed (Path.rglob before Python 3.13), while
    a linked class folder was: its images were left out without a word. A link loop is walked once."""
    root = write_folder(tmp_path / "imgs")
    extra = write_folder(tmp_path / "elsewhere", classes=("more",))
    (root / "cat" / "linked").symlink_to(extra / "more", target_is_directory=True)
    (root / "cat" / "loop").symlink_to(root / "cat", target_is_directory=True)
    ds = build_dataset(DataSpec(name="folder", root=str(root)))
    cats = sorted(p.relative_to(root / "cat").as_posix() for p in ds.files if p.is_relative_to(root / "cat"))
    assert cats == ["0.png", "1.png", "2.png", "linked/0.png", "linked/1.png", "linked/2.png"]


def test_folder_reads_16_bit_grayscale_at_its_brightness(tmp_path):
    """A 16-bit grayscale PNG (mode I;16) came out white: convert("RGB") clips its values at 255."""
    from PIL import Image

    (tmp_path / "imgs" / "gray").mkdir(parents=True)
    levels = np.array([0, 64, 128, 255]) * 257  # 8-bit levels in 16 bits
    image = np.repeat(levels, 4)[None].repeat(16, 0).astype(np.uint16)  # (16, 16): four bands of 4 columns
    Image.fromarray(image).save(tmp_path / "imgs" / "gray" / "a.png")
    ds = build_dataset(DataSpec(name="folder", root=str(tmp_path / "imgs"), image_size=16))
    with Image.open(ds.files[0]) as im:
        assert im.mode in ("I;16", "I")  # older Pillows open it in mode I
    x = ds.load_uint8(0)  # (3, 16, 16)
    assert x[:, 0, ::4].tolist() == [[0, 64, 128, 255]] * 3
    # mode I (how older Pillows opened 16-bit PNGs): the same scale
    from dimr_lab.data.folder import to_rgb

    assert np.asarray(to_rgb(Image.fromarray(np.array([[0, 32896, 65535]], np.int32)))).tolist() == \
        [[[0, 0, 0], [128, 128, 128], [255, 255, 255]]]


def test_an_image_over_pillows_pixel_limit_is_one_line(tmp_path, monkeypatch):
    """Pillow's DecompressionBombError (an image over Image.MAX_IMAGE_PIXELS, e.g. 20000x20000) is not an
    OSError: it was a traceback and exit status 1. A limit of 100 pixels stands in for a 400-megapixel file."""
    from PIL import Image

    root = write_folder(tmp_path / "imgs")
    ds = build_dataset(DataSpec(name="folder", root=str(root), image_size=16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UserError, match=r"ant/0\.png: cannot read image \(Image size \(960 pixels\) exceeds limit"):
        ds[0]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_broken_image_is_one_line_with_dataloader_workers_too(tmp_path, workers):
    """A worker's UserError reached the main process re-raised by torch with the worker's traceback in its
    message (~25 lines); it now comes out as the same one line as without workers."""
    from dimr_lab.train.loop import BatchOrder, batch_iterator

    root = write_folder(tmp_path / "imgs")
    ds = build_dataset(DataSpec(name="folder", root=str(root), image_size=16))
    x, y = next(batch_iterator(ds, BatchOrder(len(ds), 6, seed=0), 0, 1, num_workers=workers))
    x0, y0 = next(batch_iterator(ds, BatchOrder(len(ds), 6, seed=0), 0, 1, num_workers=0))
    assert torch.equal(x, x0) and torch.equal(y, y0), "healthy batches are what they were"
    (root / "ant" / "1.png").write_bytes(b"not a png")
    batches = batch_iterator(ds, BatchOrder(len(ds), 6, seed=0), 0, 1, num_workers=workers)
    with pytest.raises(UserError) as err:
        next(batches)
    assert str(err.value) == f"{root / 'ant' / '1.png'}: cannot read image (cannot identify image file " \
                             f"{str(root / 'ant' / '1.png')!r})"
    del batches


# ---- latents ------------------------------------------------------------------------------------


def write_released_layout(root, n=4, c=4, s=8):
    """Files exactly as the released extraction writes them: {idx}.npy = pickled (moments, label)."""
    root.mkdir()
    rng = np.random.default_rng(0)
    moments = rng.standard_normal((n, 2 * c, s, s)).astype(np.float32)
    for i in range(n):
        pair = np.empty(2, dtype=object)
        pair[0], pair[1] = moments[i], np.int64(i % 3)
        np.save(root / f"{i}.npy", pair)
    return moments


def test_latents_released_layout(tmp_path):
    moments = write_released_layout(tmp_path / "lat")
    with pytest.raises(SpecError, match="data.num_classes"):
        build_dataset(DataSpec(name="latents", root=str(tmp_path / "lat"), image_size=8))
    spec = DataSpec(name="latents", root=str(tmp_path / "lat"), image_size=8, num_classes=3)
    test = build_dataset(spec, split="test")
    assert test.kind == "latents" and test.channels == 4 and test.image_size == 8 and len(test) == 4
    z, y = test[2]
    assert z.shape == (4, 8, 8) and y == 2
    assert torch.allclose(z, 0.18215 * torch.from_numpy(moments[2, :4])), "test split: scaled posterior mean"
    torch.manual_seed(0)
    zt, _ = build_dataset(spec, split="train")[2]
    std = torch.exp(0.5 * torch.from_numpy(moments[2, 4:]))
    noise = (zt / 0.18215 - torch.from_numpy(moments[2, :4])) / std
    assert not torch.allclose(zt, z) and 0.5 < noise.std() < 1.5, "train split: a posterior sample"
    with pytest.raises(SpecError, match="data.image_size"):
        build_dataset(DataSpec(name="latents", root=str(tmp_path / "lat"), image_size=16, num_classes=3))
    (tmp_path / "lat" / "1.npy").unlink()
    with pytest.raises(UserError, match="1.npy is missing"):
        build_dataset(spec)
    with pytest.raises(SpecError, match="data.root"):
        build_dataset(DataSpec(name="latents", root=str(tmp_path / "none")))


def test_latent_labels_are_checked_against_the_classes(tmp_path):
    """A label >= num_classes indexed past the label table after step 1 (IndexError), and one equal to it
    trained silently as the null label: each item read checks it, 0.npy and meta.json at construction."""
    write_released_layout(tmp_path / "lat")  # labels 0, 1, 2, 0
    ds = build_dataset(DataSpec(name="latents", root=str(tmp_path / "lat"), num_classes=2), split="test")
    assert ds[1][1] == 1 and ds[3][1] == 0
    with pytest.raises(UserError, match=r"2\.npy: label 2 is outside 0\.\.1 \(data\.num_classes = 2\)"):
        ds[2]  # the null label of a 2-class network
    (tmp_path / "lat" / "meta.json").write_text(json.dumps({"num_classes": 2}))
    with pytest.raises(UserError, match=r"label 2 is outside 0\.\.1 \(num_classes of .*meta\.json = 2\)"):
        build_dataset(DataSpec(name="latents", root=str(tmp_path / "lat")))[2]
    with pytest.raises(SpecError, match=r"data\.num_classes: is 3 but .*meta\.json says the latents have 2"):
        build_dataset(DataSpec(name="latents", root=str(tmp_path / "lat"), num_classes=3))
    (tmp_path / "lat" / "meta.json").unlink()
    pair = np.load(tmp_path / "lat" / "0.npy", allow_pickle=True)
    pair[1] = np.int64(7)
    np.save(tmp_path / "lat" / "0.npy", pair)
    with pytest.raises(UserError, match=r"0\.npy: label 7 is outside 0\.\.2"):
        build_dataset(DataSpec(name="latents", root=str(tmp_path / "lat"), num_classes=3))


def _damage_item(root, name, change):
    pair = np.load(root / name, allow_pickle=True)
    change(pair)
    np.save(root / name, pair)


@pytest.mark.parametrize("damage,message", [
    (lambda r: np.save(r / "3.npy", np.array([np.zeros((8, 4, 4), np.float32), np.int64(0)], dtype=object)),
     r"3\.npy: moments of shape \(8, 4, 4\), but 0\.npy's are \(8, 8, 8\)"),
    (lambda r: _damage_item(r, "2.npy", lambda p: p[0].__setitem__((0, 0, 0), np.inf)),
     r"2\.npy: moments hold NaN or inf"),
    (lambda r: _damage_item(r, "1.npy", lambda p: p.__setitem__(1, 1.0)), r"1\.npy: not a latent file.*integer label"),
    (lambda r: _damage_item(r, "2.npy", lambda p: p.__setitem__(0, p[0].astype(np.complex64))),
     r"2\.npy: not a latent file.*moments of dtype complex64; expected floating point"),
    (lambda r: _damage_item(r, "3.npy", lambda p: p.__setitem__(0, p[0].astype(np.int32))),
     r"3\.npy: not a latent file.*moments of dtype int32; expected floating point"),
])
def test_odd_latent_items_are_one_line(tmp_path, damage, message):
    """An item that does not fit the dataset: a moments shape other than 0.npy's (collate's torch.stack raised
    RuntimeError), non-finite moments (trained to a NaN loss), a float label, complex moments (their imaginary
    part was dropped with a warning) or integer ones (read as latents)."""
    write_released_layout(tmp_path / "lat")
    damage(tmp_path / "lat")
    ds = build_dataset(DataSpec(name="latents", root=str(tmp_path / "lat"), num_classes=3))
    with pytest.raises(UserError, match=message):
        [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("meta,message", [
    ('{"num_classes": "two"}', r"meta\.json: num_classes is 'two'; expected a positive integer"),
    ("[1, 2]", r"meta\.json: expected a JSON object .*got a list"),
    ('{"num_classes": 3, "count": 5}', r"meta\.json: count is 5 but the folder holds 4 latent files"),
    ('{"num_classes": 3, "scale_factor": NaN}', r"meta\.json: scale_factor is nan; expected a finite number > 0"),
    ('{"num_classes": 3, "scale_factor": "x"}', r"meta\.json: scale_factor is 'x'"),
    ('{"num_classes": 3, "classes": "abc"}', r"meta\.json: classes is 'abc'; expected a list"),
    ('{"num_classes": 3, "classes": ["a", "b"]}', r"meta\.json: classes lists 2 names, but num_classes of .*= 3"),
    (None, r"0\.npy: not a latent file.*integer label.*float32 of shape \(8, 8, 8\)"),
], ids=["classes-str", "list", "count", "scale-nan", "scale-str", "names-str", "names-count", "float-array"])
def test_odd_latents_folders_are_one_line(tmp_path, meta, message):
    """meta.json's values (num_classes "two" raised ValueError, a list AttributeError) and a 0.npy that is a
    plain float array (int() of its second row raised TypeError) are refused at construction."""
    write_released_layout(tmp_path / "lat")
    if meta is None:
        np.save(tmp_path / "lat" / "0.npy", np.zeros((2, 8, 8, 8), np.float32))
    else:
        (tmp_path / "lat" / "meta.json").write_text(meta)
    with pytest.raises(UserError, match=message):
        build_dataset(DataSpec(name="latents", root=str(tmp_path / "lat"), num_classes=3 if meta is None else 0))


def tiny_vae():
    """A randomly initialised AutoencoderKL small enough for a unit test (downsamples by 2, no download)."""
    if importlib.util.find_spec("diffusers") is None:  # not installed; one that fails to import is a failure
        pytest.skip("prepare_latents needs the optional 'latents' extra (diffusers)")
    import diffusers
    import safetensors.torch  # noqa: F401  (for save_pretrained, as _load_vae imports it for from_pretrained)
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4, sample_size=16,
    ).eval()


def test_prepare_latents_round_trip(tmp_path):
    from dimr_lab.data import prepare_latents
    from dimr_lab.data.folder import FolderDataset

    vae = tiny_vae()
    src = write_folder(tmp_path / "imgs")
    meta = prepare_latents(src, tmp_path / "lat", vae=vae, image_size=16, batch_size=4, flip=True)
    assert meta["count"] == 12 and meta["num_classes"] == 2 and meta["latent_size"] == 8
    assert json.loads((tmp_path / "lat" / "meta.json").read_text())["scale_factor"] == pytest.approx(0.18215)
    ds = build_dataset(DataSpec(name="latents", root=str(tmp_path / "lat"), image_size=8), split="test")
    assert len(ds) == 12 and ds.num_classes == 2 and ds.channels == 4
    # batch 1 of 4 images: files 0-3 the originals, 4-7 their flips (the released order)
    images = FolderDataset(src, 16)
    x = torch.stack([images[i][0] for i in range(4)])  # (4, 3, 16, 16)
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean  # (4, 4, 8, 8)
        mean_flip = vae.encode(x.flip(-1)).latent_dist.mean
    assert torch.allclose(ds[1][0], 0.18215 * mean[1], atol=1e-5)
    assert torch.allclose(ds[5][0], 0.18215 * mean_flip[1], atol=1e-5)
    assert [ds[i][1] for i in range(8)] == [images[i][1] for i in range(4)] * 2
    with pytest.raises(UserError, match="already holds latent files"):
        prepare_latents(src, tmp_path / "lat", vae=vae, image_size=16, batch_size=4)


def test_prepare_latents_writes_all_or_nothing(tmp_path, capsys):
    """A broken image half-way left the files before it and no meta.json, and the next attempt refused the
    folder ("already holds latent files"): the files are now written into a temporary sibling and renamed at
    the end, so a failure leaves nothing (not even the parents it made) and the same command can run again."""
    from dimr_lab.atomic import _umask
    from dimr_lab.cli import main
    from dimr_lab.data import prepare_latents

    vae = tiny_vae()
    src = write_folder(tmp_path / "imgs")
    good = (src / "cat" / "2.png").read_bytes()
    (src / "cat" / "2.png").write_bytes(b"not a png")  # the last image: batches 1 and 2 of 3 encode first
    out = tmp_path / "new" / "deeper" / "lat"
    with pytest.raises(UserError, match=r"cat/2\.png: cannot read image"):
        prepare_latents(src, out, vae=vae, image_size=16, batch_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"], "no output, parents or temporary folder left"
    vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(SystemExit) as exc:
        main(["prepare-latents", str(src), str(out), "--vae", str(tmp_path / "vae"), "--image-size", "16"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "cat/2.png: cannot read image" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "vae"]
    (src / "cat" / "2.png").write_bytes(good)
    out.mkdir(parents=True)  # an empty folder is taken as well as a new one
    meta = prepare_latents(src, out, vae=vae, image_size=16, batch_size=2)
    assert meta["count"] == 12 and sorted(p.name for p in out.parent.iterdir()) == ["lat"]
    assert len(build_dataset(DataSpec(name="latents", root=str(out)))) == 12
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask(), "the umask's permissions, not a temporary's 0700"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="other: is not empty"):
        prepare_latents(src, tmp_path / "other", vae=vae, image_size=16)
    with torch.no_grad():
        vae.encoder.conv_in.weight[0, 0, 0, 0] = float("nan")  # a VAE that encodes to NaN: refused, nothing left
    with pytest.raises(UserError, match=r"ant/0\.png \.\. .*ant/1\.png: the VAE encodes these images to NaN"):
        prepare_latents(src, tmp_path / "nan", vae=vae, image_size=16, batch_size=2)
    assert not (tmp_path / "nan").exists() and not list(tmp_path.glob(".nan*"))


def test_prepare_latents_syncs_files_and_folder_before_the_rename(tmp_path, monkeypatch):
    """The .npy files were written without a sync and their folder renamed into place: after a power loss
    the rename could be on disk and the files' bytes not, a complete-looking folder of empty files. The
    files are now synced (one sync after the last is written) and the folder fsynced before the rename,
    and the parent after it."""
    import os

    from dimr_lab.data import prepare_latents

    events = []
    real_fsync, real_rename, real_sync, real_save = os.fsync, os.rename, os.sync, np.save

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(src), str(dst)))
        return real_rename(src, dst)

    def sync():
        events.append(("sync",))
        return real_sync()

    def save(path, *a, **k):
        events.append(("save", str(path)))
        return real_save(path, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "sync", sync)
    monkeypatch.setattr(np, "save", save)
    src = write_folder(tmp_path / "imgs")
    out = tmp_path / "lat"
    meta = prepare_latents(src, out, vae=tiny_vae(), image_size=16, batch_size=4)
    renames = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(out)]
    assert len(renames) == 1, events
    _, tmp, _ = events[renames[0]]
    saves = [i for i, e in enumerate(events) if e[0] == "save"]
    assert len(saves) == meta["count"] and all(events[i][1].startswith(tmp) for i in saves), events
    syncs = [i for i, e in enumerate(events) if e[0] == "sync"]
    assert syncs and saves[-1] < syncs[-1] < renames[0], "the files' bytes are flushed before the rename"
    assert ("fsync", tmp) in events[syncs[-1]:renames[0]], "the folder's entries are flushed before the rename"
    assert ("fsync", str(tmp_path)) in events[renames[0]:], "the rename itself is flushed"


def test_prepare_latents_cli(tmp_path, capsys, monkeypatch):
    import sys

    import safetensors

    from dimr_lab.cli import main

    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    src = write_folder(tmp_path / "imgs", sizes=((20, 20),))
    # as in a fresh process without accelerate: nothing has imported safetensors.torch, which diffusers
    # (0.29 to 0.32) reads the VAE's weights through without importing it
    monkeypatch.delitem(sys.modules, "safetensors.torch")
    monkeypatch.delattr(safetensors, "torch")
    try:
        main(["prepare-latents", str(src), str(tmp_path / "lat"), "--vae", str(tmp_path / "vae"),
              "--image-size", "16", "--batch-size", "2", "--no-flip"])
    except SystemExit as exc:  # typer may end a successful command with exit status 0
        assert not exc.code
    assert "wrote 2 latent files" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "lat").iterdir()) == ["0.npy", "1.npy", "meta.json"]
    for argv in ([str(src), str(tmp_path / "o2")],
                 [str(src), str(tmp_path / "o3"), "--vae", str(tmp_path / "novae")],
                 [str(tmp_path / "nosrc"), str(tmp_path / "o4"), "--vae", str(tmp_path / "vae")]):
        with pytest.raises(SystemExit) as exc:
            main(["prepare-latents", *argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_latent_files_cannot_run_code(tmp_path):
    """A latent file is unpickled with an allow-list: numpy arrays and scalars only."""
    import os

    import numpy as np

    from dimr_lab.data.latents import load_latent_file
    from dimr_lab.errors import UserError

    good = tmp_path / "0.npy"
    np.save(good, np.array([np.ones((8, 4, 4), np.float32), np.int64(3)], dtype=object), allow_pickle=True)
    moments, label = load_latent_file(good)
    assert moments.shape == (8, 4, 4) and label == 3

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "1.npy"
    np.save(bad, np.array([Evil(), 1], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="refusing to load"):
        load_latent_file(bad)
    assert not (tmp_path / "pwned").exists()


def test_decode_latents_through_the_data_vae(tmp_path):
    """Latent samples decode through data.vae (its scaling factor undone) into images in [-1, 1]."""
    from dimr_lab.data.latents import decode_latents

    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    z = torch.randn(3, 4, 8, 8)
    images = decode_latents(z, DataSpec(name="latents", vae=str(tmp_path / "vae")), batch_size=2)
    with torch.no_grad():
        ref = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)
    assert images.shape == (3, 3, 16, 16)
    torch.testing.assert_close(images, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(SpecError, match="data.vae"):
        decode_latents(z, DataSpec(name="latents"))


LATENTS_RUN = """
[model]
preset = "dimr_tiny_2r"
image_size = 8
in_channels = 4
num_classes = 3
branches = [{width = 16, depth = 1, heads = 2}, {width = 8, depth = 1}]
[data]
name = "latents"
root = "ROOT"
num_classes = 3
num_workers = 0
[train]
steps = STEPS
batch_size = 2
threads = 1
lr = 1e-3
warmup_steps = 1
checkpoint_every = 100
[eval]
enabled = false
feature_extractor = "inception-v3-compat"
metrics = ["fid"]
"""


def test_a_resumed_latents_run_is_bit_exact(tmp_path):
    """The trainer read dataset[0] for the input shape at every session start, and a latents item draws its
    posterior sample from the global RNG: a run trained 2 + 2 steps ended elsewhere than one trained 4."""
    from dimr_lab.spec.run_spec import load_run_spec
    from dimr_lab.train.trainer import train_run

    write_released_layout(tmp_path / "lat")

    def spec(steps):
        path = tmp_path / f"run_{steps}.toml"
        path.write_text(LATENTS_RUN.replace("ROOT", str(tmp_path / "lat")).replace("STEPS", str(steps)))
        return load_run_spec(path)

    train_run(spec(4), tmp_path / "direct", progress=False, evaluate=False)
    train_run(spec(2), tmp_path / "resumed", progress=False, evaluate=False)
    train_run(spec(4), tmp_path / "resumed", progress=False, evaluate=False)
    a, b = (torch.load(tmp_path / run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
            for run in ("direct", "resumed"))
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
