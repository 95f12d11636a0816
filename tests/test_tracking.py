"""Tracking: a tiny run with TensorBoard and wandb (offline) on writes what their own readers parse."""

from __future__ import annotations

import importlib.util

import pytest

from dimr_lab.spec.run_spec import load_run_spec


def _tiny(track):
    return load_run_spec(None, [("train.steps", 4), ("train.log_every", 2), ("eval.samples", 16), ("eval.batch_size", 8),
                                ("eval.metrics", ["sample_accuracy"]), ("sample.steps", 2), ("sample.grid_size", 4),
                                ("data.train_size", 64), ("train.batch_size", 8), *track])


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="the tracking extra is not installed")
def test_tensorboard_event_files_have_the_training_and_evaluation_tags(tmp_path, classifier_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dimr_lab.train.trainer import train_run

    train_run(_tiny([("track.tensorboard", True)]), tmp_path / "run", progress=False)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/loss_branch0", "train/lr", "train/images_per_s", "eval/sample_accuracy"} <= scalars
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 4]
    assert "eval/samples" in acc.Tags()["images"]


def wandb_records(path):
    """The protobuf records of a wandb offline run file: its ':W&B' header, then LevelDB's log format (32 KiB
    blocks of chunks, each with a 7-byte header: crc, length, type), each record a wandb Record message."""
    import struct

    from wandb.proto import wandb_internal_pb2

    block = 32768
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def finished_wandb_records(run_dir, timeout_s=60.0):
    """The records of the run's wandb offline store once its 'exit' record is written: wandb's service writes
    the store on its own schedule, and on a loaded machine it can hold nothing but its header when finish()
    has returned (the process's exit flushes it). Fails after timeout_s without the exit record."""
    import time

    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout_s
    while True:
        stores = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        try:
            records = list(wandb_records(stores[0])) if len(stores) == 1 else []
        except DecodeError:  # a record still being written
            records = []
        if any(rec.HasField("exit") for rec in records):
            return records
        assert time.monotonic() < deadline, f"no finished wandb store under {run_dir} after {timeout_s} s: {stores}"
        time.sleep(0.2)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="the tracking extra is not installed")
def test_wandb_offline_run_records_the_runs_history(tmp_path, classifier_cache):
    from dimr_lab.train.trainer import train_run

    train_run(_tiny([("track.wandb", True)]), tmp_path / "run", progress=False)
    keys, group = set(), None
    for rec in finished_wandb_records(tmp_path / "run"):
        if rec.HasField("history"):
            keys |= {item.key or "/".join(item.nested_key) for item in rec.history.item}
        if rec.HasField("run"):
            group = rec.run.run_group
    assert {"train/loss", "train/loss_branch0", "eval/sample_accuracy"} <= keys
    assert group == "single runs"


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="the tracking extra is not installed")
def test_wandb_keeps_the_evaluations_of_earlier_steps(tmp_path, classifier_cache):
    import json

    from dimr_lab.train.trainer import train_run

    # eval.steps = [2]: step 2 is evaluated after training, when wandb's history is at step 4
    train_run(_tiny([("track.wandb", True), ("eval.steps", [2])]), tmp_path / "run", progress=False)
    evals, train_steps = {}, []
    for rec in finished_wandb_records(tmp_path / "run"):
        if rec.HasField("history"):
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            if "eval/sample_accuracy" in row:
                # the image's file: a nested key of its own, or (older wandb) inside the image's JSON
                image = "eval/samples/path" in row or "path" in (row.get("eval/samples") or {})
                evals[row["eval/step"]] = (row["eval/sample_accuracy"], image)
            if "train/loss" in row:
                train_steps.append(row["_step"])
    assert set(evals) == {2, 4} and all(image for _, image in evals.values()), evals
    assert train_steps == [1, 2, 4]
    for step in (2, 4):
        metrics = json.loads(next((tmp_path / "run" / "evals").glob(f"step-{step:08d}-*/metrics.json")).read_text())
        assert evals[step][0] == pytest.approx(metrics["sample_accuracy"])


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="the tracking extra is not installed")
def test_a_continued_run_does_not_track_its_earlier_evaluations_again(tmp_path, classifier_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dimr_lab.train.trainer import train_run

    track = [("track.tensorboard", True), ("eval.steps", [2])]
    train_run(_tiny(track), tmp_path / "run", progress=False)
    train_run(_tiny([*track, ("train.steps", 6)]), tmp_path / "run", progress=False)  # step 2's evaluation is reused
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/sample_accuracy")] == [2, 4, 6]
    assert [e.step for e in acc.Images("eval/samples")] == [2, 4, 6]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 4, 6]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="the tracking extra is not installed")
def test_wandb_takes_a_run_folder_whose_name_has_characters_a_run_id_may_not(tmp_path, monkeypatch):
    from dimr_lab.train.trainer import train_run

    monkeypatch.setenv("DIMR_LAB_CACHE", str(tmp_path / "cache"))
    spec = _tiny([("track.wandb", True), ("train.steps", 1), ("eval.enabled", False)])
    train_run(spec, tmp_path / "lr:1e-3,bs'8", progress=False)  # wandb refused the run id (a traceback)
    (run,) = [rec.run for rec in finished_wandb_records(tmp_path / "lr:1e-3,bs'8") if rec.HasField("run")]
    assert run.run_id == f"lr-1e-3-bs-8-{spec.identity_hash()}" and run.display_name == "lr:1e-3,bs'8"
