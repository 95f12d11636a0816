"""Run folders -> a runs frame: one row per run with the evaluation chosen for the table (or every step of it
for learning curves). Run folders are read through dimr_lab.rundir only, so no file name is spelled here."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd

from dimr_lab.errors import UserError, unknown_name_message
from dimr_lab.provenance import machine_label
from dimr_lab.rundir import Evaluation, RunDir, RunRecord, find_runs
from dimr_lab.spec.run_spec import (OUTSIDE_EVAL_IDENTITY, EvalSpec, RunSpec, SampleSpec, load_run_spec,
                                    stable_hash)
from dimr_lab.table.paper import attach_paper
from dimr_lab.table.values import METRICS, flatten, integer_columns, number, quietly, scalar, short

EVAL_SECTIONS = ("sample", "eval")
_SECTION_TYPES = {"sample": SampleSpec, "eval": EvalSpec}
# columns every runs frame has, in this order (factor.* and grid.* follow the ids, paper_* the rest)
ID_COLUMNS = ("ablation", "title", "profile", "variant", "variant_index", "seed", "base_variant", "grid",
              "folder", "paper")
# eval_hash names the evaluation's settings (a legacy folder's: its spec's); eval_settings spells them out (JSON)
# machine: where the evaluation ran (provenance.machine_label; empty for evaluations from before it was recorded)
RUN_COLUMNS = ("step", "images_seen", "eval_hash", "eval_label", "eval_settings", "data_key", "git_commit",
               "git_dirty", "machine")
# keys of one run's plan: another folder with the same key and a newer evaluation supersedes it
PLAN_KEY = ["ablation", "profile", "variant", "grid", "seed"]


class Damaged(str):
    """A warning about a damaged file (a record or metrics file that does not read): `table` stops on it
    unless told to leave such runs out."""


@dataclass
class Run:
    """One readable run folder: its record, resolved spec, planned evaluation settings and evaluations."""

    folder: Path
    record: RunRecord
    spec: RunSpec
    planned_hash: str
    planned: dict[str, Any]              # flattened sample/eval settings that name an evaluation
    evaluations: list[Evaluation]

    @property
    def data_key(self) -> str:
        """Dataset and resolutions: rows with different keys are never compared."""
        d, m = self.spec.data, self.spec.model
        return f"{d.name}:{d.image_size}:{m.image_size}"


# ------------------------------------------------------------------------------------ --eval filters

def parse_eval_filter(items: Iterable[Any] | None) -> list[tuple[str, Any]]:
    """--eval KEY=VALUE items (or (key, value) pairs) as pairs; keys must be sample.* or eval.* settings."""
    pairs = []
    for item in items or []:
        if isinstance(item, str):
            key, eq, value = item.partition("=")
            if not eq:
                raise UserError(f"--eval {item!r}: expected KEY=VALUE, e.g. sample.guidance_scale=1.5")
        else:
            key, value = item
        key = key.strip()
        if key.split(".", 1)[0] not in EVAL_SECTIONS or "." not in key:
            raise UserError(f"--eval {key}: evaluation settings are sample.* or eval.* keys "
                            f"(e.g. sample.guidance_scale)")
        section, name = key.split(".", 1)
        known = sorted(f.name for f in fields(_SECTION_TYPES[section]))
        if name not in known:
            raise UserError(unknown_name_message(f"--eval {section}.* key", name, known))
        pairs.append((key, value))
    return pairs


def _same(have: Any, want: Any) -> bool:
    """Whether a setting's value equals a wanted one; text from the command line is read as JSON first."""
    if isinstance(want, str):
        try:
            want = json.loads(want)
        except ValueError:
            pass
    if isinstance(have, bool) or isinstance(want, bool):
        return have is want or short(have) == short(want)
    if isinstance(have, (int, float)) and isinstance(want, (int, float)):
        return math.isclose(float(have), float(want), rel_tol=1e-9, abs_tol=1e-12)
    return have == want or short(have) == short(want)


def matches(settings: dict[str, Any], pairs: list[tuple[str, Any]]) -> bool:
    """Whether an evaluation's settings hold every (dotted key, value) pair."""
    flat = flatten(settings)
    return all(key in flat and _same(flat[key], want) for key, want in pairs)


def filter_text(pairs: list[tuple[str, Any]]) -> str:
    return ", ".join(f"{k}={short(v)}" for k, v in pairs)


# ------------------------------------------------------------------------------------ reading runs

def _identity_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The flattened settings that name an evaluation (batch sizes, grid sizes and the like left out)."""
    skip = {f"{section}.{k}" for section, keys in OUTSIDE_EVAL_IDENTITY.items() for k in keys}
    return {k: v for k, v in flatten({s: settings.get(s, {}) for s in EVAL_SECTIONS}).items() if k not in skip}


def settings_label(run: Run, ev: Evaluation) -> str:
    """Short text of the settings where an evaluation differs from the run's plan ('' when it is the plan)."""
    if _planned(run, ev):
        return ""
    have = _identity_settings(ev.settings)
    diff = [f"{k}={short(v)}" for k, v in sorted(have.items())
            if k not in run.planned or not _same(run.planned[k], v)]
    return ", ".join(diff) or f"settings {ev.eval_hash}"


def _planned(run: Run, ev: Evaluation) -> bool:
    """Whether ev has the run's planned settings (an old folder's single evaluation used the spec's own)."""
    return ev.eval_hash in ("", run.planned_hash)


def _read_run(folder: Path, warnings: list[str]) -> Run | None:
    """The run in folder, or None with a warning saying why it is skipped."""
    rd = RunDir(folder)
    try:
        if rd.record_path.exists():
            record = rd.read_record()
        else:  # a folder with only the trainer's spec.json: a run of its own, named by its folder
            record = RunRecord(spec=rd.read_spec_document(), identity="", variant=folder.name)
        spec = load_run_spec(record.spec, file=str(rd.record_path))
    except UserError as err:
        warnings.append(Damaged(f"skipped {folder}: {err}"))
        return None
    if not 0 <= record.seed < 2**63:
        warnings.append(f"skipped {folder}: seed {record.seed} is not a usable seed")
        return None
    planned = spec.eval_identity()
    return Run(folder, record, spec, stable_hash(planned), _identity_settings(planned), rd.evaluations())


def _finished(run: Run, warnings: list[str], pairs: list[tuple[str, Any]]) -> list[Evaluation]:
    """The run's finished evaluations matching the filter; broken ones and an unfinished run are warned about."""
    for ev in run.evaluations:
        if ev.problem:
            warnings.append(Damaged(f"{run.folder}: evaluation {ev.name}: {ev.problem}"))
    done = [ev for ev in run.evaluations if ev.done]
    if not done:
        pending = [ev.name for ev in run.evaluations if not ev.done and not ev.problem]
        why = f"evaluation {pending[-1]} not finished" if pending else "no finished evaluation"
        warnings.append(f"skipped {run.folder}: unfinished ({why})")
        return []
    hit = [ev for ev in done if matches(ev.settings, pairs)]
    if not hit:
        warnings.append(f"skipped {run.folder}: no finished evaluation with {filter_text(pairs)}")
    return hit


def _finish_time(ev: Evaluation) -> float:
    """When an evaluation finished (its folder's newest file): breaks ties between settings at one step."""
    try:
        return max((p.stat().st_mtime for p in ev.path.iterdir() if p.is_file()), default=0.0)
    except OSError:
        return 0.0


def _choose(run: Run, step: int | None, pairs: list[tuple[str, Any]], warnings: list[str]) -> Evaluation | None:
    """The evaluation a run shows in the table: at `step` (default: its latest finished one), with its
    planned settings when they were evaluated there, else the newest; a warning says which."""
    done = _finished(run, warnings, pairs)
    if not done:
        return None
    if step is None:
        step = max(ev.step for ev in done)
        broken = [ev for ev in run.evaluations if ev.problem and ev.step > step]
        if broken:  # its latest evaluation does not read: an earlier step would stand in for it unseen
            warnings.append(Damaged(f"skipped {run.folder}: its latest evaluation ({broken[-1].name}) is damaged; "
                                    f"not replaced by step {step}"))
            return None
    here = [ev for ev in done if ev.step == step]
    if not here:
        steps = ", ".join(str(s) for s in sorted({ev.step for ev in done}))
        warnings.append(f"skipped {run.folder}: no finished evaluation at step {step} (finished: {steps})")
        return None
    planned = [ev for ev in here if _planned(run, ev)]
    if planned:
        return planned[-1]
    chosen = max(here, key=_finish_time)
    if not pairs or len(here) > 1:  # an explicit --eval that picks one evaluation needs no comment
        newest = f" (the newest of {len(here)} evaluations there)" if len(here) > 1 else ""
        warnings.append(f"{run.folder}: step {step} has no evaluation with the planned settings "
                        f"({run.planned_hash}); using {settings_label(run, chosen)}{newest}")
    return chosen


# ------------------------------------------------------------------------------------ rows

def _metric(run: Run, ev: Evaluation, key: str, warnings: list[str]) -> float:
    """metrics[key] as a float; anything but a number (or null) is NaN with a warning naming it."""
    raw = (ev.metrics or {}).get(key)
    value, why = number(raw)
    if why:
        warnings.append(f"{run.folder}: {ev.name}: {key}={repr(raw)[:40]} {why}; left empty")
    return value


def _row(run: Run, ev: Evaluation, warnings: list[str]) -> dict[str, Any]:
    """One runs-frame row: who planned the run, its factors and grid point, and the evaluation's metrics."""
    rec, metrics = run.record, ev.metrics or {}
    index, why = number(rec.variant_index)
    if why:
        warnings.append(f"{run.folder}: variant_index {repr(rec.variant_index)[:40]} {why}; ordered last")
    row: dict[str, Any] = {
        "ablation": rec.ablation,
        "title": rec.title or rec.ablation or "runs",
        "profile": rec.profile,
        "variant": rec.variant or run.folder.name,
        "variant_index": index,
        "seed": rec.seed,
        "base_variant": rec.baseline or None,
        "grid": json.dumps(rec.grid, sort_keys=True, default=str),
        "folder": str(run.folder),
        "paper": json.dumps(rec.paper, sort_keys=True) if rec.paper else None,
    }
    row.update({f"factor.{k}": scalar(v) for k, v in rec.factors.items()})
    row.update({f"grid.{k}": scalar(v) for k, v in rec.grid.items()})
    values = {key: _metric(run, ev, key, warnings) for key in (*METRICS, "images_seen")}
    row.update({col: values[key] / 1e6 if key == "params" else values[key] for key, col in METRICS.items()})
    step = ev.step if ev.step >= 0 else math.nan
    seen = values["images_seen"]
    if math.isnan(seen):  # older metrics.json: the global batch times the steps trained
        seen = step * run.spec.train.batch_size
    commit, dirty = metrics.get("git_commit"), metrics.get("git_dirty")
    row.update({
        "step": step,
        "images_seen": seen,
        "eval_hash": ev.eval_hash or run.planned_hash,  # a legacy folder's evaluation has its spec's settings
        "eval_label": settings_label(run, ev),
        "eval_settings": json.dumps(_identity_settings(ev.settings) if ev.eval_hash else run.planned,
                                    sort_keys=True, default=str),
        "data_key": run.data_key,
        "git_commit": commit if isinstance(commit, str) else None,
        "git_dirty": dirty if isinstance(dirty, bool) else None,
        "machine": machine_label(metrics.get("machine")),
        "_time": _finish_time(ev),
        "_trains": json.dumps(_settings(run.spec.identity()), sort_keys=True, default=str),
        **{column: metrics.get(key) if isinstance(metrics.get(key), str) else None
           for column, key, _, _ in INSTRUMENTS},
    })
    return row


# metrics.json's digests of what measured an evaluation: (hidden column, key, what it is, how to agree)
INSTRUMENTS = (
    ("_classifier", "classifier_digest", "dataset classifiers",
     "classifier FIDs, sample accuracy and distortion rates compare only under one; a classifier trained again "
     "elsewhere (another machine, thread count, its time limit) is another; re-evaluate under one cache "
     "(DIMR_LAB_CACHE) to compare them"),
    ("_extractor", "extractor_digest", "Inception weights files",
     "FID, KID, IS and precision/recall compare only under one; re-evaluate with one eval.inception_weights"),
    ("_reference", "reference_digest", "reference statistics files",
     "FIDs against different reference batches do not compare; re-evaluate with one eval.reference_stats"),
)


def _instruments(runs: pd.DataFrame) -> list[str]:
    """A warning per ablation and profile whose evaluations were measured by different instruments: dataset
    classifiers, Inception weights or reference statistics (metrics.json's digests of them). An evaluation's
    name holds these files' paths, not their content, so a file replaced at the same path shows only here.
    Evaluations from before a digest was recorded are not counted."""
    out = []
    for (ablation, profile), group in runs.groupby(["ablation", "profile"], sort=False, dropna=False):
        where = f"{ablation} ({profile})" if isinstance(profile, str) and profile else str(ablation)
        for column, key, what, advice in INSTRUMENTS:
            digests = sorted({d for d in group[column] if isinstance(d, str)})
            if len(digests) > 1:
                out.append(f"{where}: its evaluations were measured by {len(digests)} different {what} "
                           f"({key} {', '.join(digests[:3])}): {advice}")
    return out


def _frame(rows: list[dict[str, Any]], key: list[str], warnings: list[str]) -> pd.DataFrame:
    """Rows as a frame in a fixed column order; superseded runs dropped, paper columns attached."""
    if not rows:
        return pd.DataFrame()
    runs = pd.DataFrame.from_records(rows)
    labels = sorted(c for c in runs.columns if c.startswith("factor.")) + \
        sorted(c for c in runs.columns if c.startswith("grid."))
    hidden = ["_time", "_trains", *(column for column, *_ in INSTRUMENTS)]
    runs = runs[[*ID_COLUMNS, *labels, *METRICS.values(), *RUN_COLUMNS, *hidden]]
    integer_columns(runs, labels)  # pandas reads branches = 3 beside a missing value as 3.0
    runs = _drop_superseded(runs, key, warnings)
    warnings.extend(attach_paper(runs))
    warnings.extend(_instruments(runs))
    return runs.drop(columns=hidden).reset_index(drop=True)


def _drop_superseded(runs: pd.DataFrame, key: list[str], warnings: list[str]) -> pd.DataFrame:
    """Keep the newest of several folders of one plan point and seed (a changed spec gets a new folder)."""
    runs = runs.sort_values("_time", ascending=False, kind="stable")
    dup = runs.duplicated(key, keep="first")
    newest = {tuple(r[k] for k in key): r["folder"] for _, r in runs[~dup].iterrows()}
    superseded = {r["folder"]: newest[tuple(r[k] for k in key)] for _, r in runs[dup].iterrows()}
    warnings.extend(f"skipped {old}: superseded by the newer {new}" for old, new in sorted(superseded.items()))
    kept = runs[~dup]
    warnings.extend(_mixed_plans(kept, runs[dup], key))
    return kept.sort_values(["folder", "step"], kind="stable")


def _settings(data: Any, prefix: str = "") -> dict[str, Any]:
    """flatten, with lists of tables by index too (model.branches.0.mlp_width): a change to one branch is
    that key, not the whole list."""
    out: dict[str, Any] = {}
    for k, v in flatten(data, prefix).items():
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(_settings(x, f"{k}.{i}"))
        else:
            out[k] = v
    return out


def _mixed_plans(kept: pd.DataFrame, older: pd.DataFrame, key: list[str]) -> list[str]:
    """A warning where a variant's newer runs changed a training setting (a --set or an edited file ran
    again) and another variant's runs compared beside them still have the value it replaced: the newest run
    of each variant and seed is kept, so until every variant's newer runs finish, a table would compare
    runs of two plans as if one. (Not said where the change belongs to the variant alone, the value the
    others have being another.)"""
    if older.empty:
        return []
    group = [k for k in key if k not in ("variant", "seed", "step")]
    trains = {r["folder"]: json.loads(r["_trains"]) for _, r in pd.concat([kept, older]).iterrows()}
    newest = {tuple(r[k] for k in key): r["folder"] for _, r in kept.iterrows()}
    out = []
    for where, rows in kept.groupby(group, sort=False, dropna=False):
        changed: dict[str, tuple[Any, Any, str]] = {}  # setting -> (value before, value now, variant)
        for _, r in older.iterrows():
            if all(r[g] == w for g, w in zip(group, where if isinstance(where, tuple) else (where,))):
                before, now = trains[r["folder"]], trains[newest[tuple(r[k] for k in key)]]
                for k in sorted(set(before) | set(now)):
                    if before.get(k) != now.get(k):
                        changed.setdefault(k, (before.get(k), now.get(k), r["variant"]))
        for k, (before, now, variant) in changed.items():
            stale = sorted({r["variant"] for _, r in rows.iterrows()
                            if r["variant"] != variant and trains[r["folder"]].get(k) == before})
            if stale:
                profile = rows["profile"].iloc[0]
                label = rows["ablation"].iloc[0] + (f" ({profile})" if profile else "")
                was, became = json.dumps(before, default=str), json.dumps(now, default=str)
                out.append(f"{label}: {variant}'s newer runs changed {k} from {was} to {became}, and the runs of "
                           f"{', '.join(stale)} compared beside them still have {was}: two plans in one table "
                           f"(finish the newer runs of every variant, or the change was meant for {variant} alone)")
    return out


def _root(results_dir: str | Path) -> Path:
    root = Path(results_dir)
    if not root.is_dir():
        raise UserError(f"results folder {root} " + ("is a file, not a folder" if root.exists() else "does not exist"))
    return root


Folders = list[tuple[Path, "Run | None", list[str]]]


def _each_run(root: Path) -> Iterator[tuple[Path, "Run | None", list[str]]]:
    """The run folders below root, each read as it comes (and dropped by a caller that keeps no reference)."""
    for folder in find_runs(root):
        said: list[str] = []
        yield folder, _read_run(folder, said), said


def read_runs(results_dir: str | Path) -> Folders:
    """Every run folder below results_dir, read once: (folder, its run or None, the warnings reading it gave),
    for collect and collect_curves to share (`table --curves` reads the tree once, and holds it)."""
    return list(_each_run(_root(results_dir)))


@quietly
def collect(results_dir: str | Path, *, step: int | None = None, eval_filter: Iterable[Any] | None = None,
            folders: Folders | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Every run below results_dir with a finished evaluation, one row each (the evaluation at `step`,
    default its latest; only evaluations whose settings match eval_filter), plus warning lines; `folders`:
    read_runs(results_dir) where the caller has read them already."""
    root, pairs = _root(results_dir), parse_eval_filter(eval_filter)
    rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    for _folder, run, said in _each_run(root) if folders is None else folders:
        warnings.extend(said)
        ev = _choose(run, step, pairs, warnings) if run is not None else None
        if ev is not None:
            rows.append(_row(run, ev, warnings))
    return _frame(rows, PLAN_KEY, warnings), warnings


@quietly
def collect_curves(results_dir: str | Path, eval_filter: Iterable[Any] | None = None, *,
                   folders: Folders | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Every finished evaluation with the planned settings (or, with eval_filter, those matching it): one
    row per run and training step, for learning curves; `folders` as for collect."""
    root, pairs = _root(results_dir), parse_eval_filter(eval_filter)
    rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    for _folder, run, said in _each_run(root) if folders is None else folders:
        warnings.extend(said)
        if run is None:
            continue
        done = [ev for ev in _finished(run, warnings, pairs) if pairs or _planned(run, ev)]
        by_step: dict[int, Evaluation] = {}
        for ev in sorted(done, key=_finish_time):  # the newest of several matching evaluations at a step
            by_step[ev.step] = ev
        rows.extend(_row(run, ev, warnings) for _, ev in sorted(by_step.items()))
    return _frame(rows, [*PLAN_KEY, "step"], warnings), warnings
