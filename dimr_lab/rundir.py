"""Run folders: the one module that knows their layout, their records and how their state is read.

torch-free: the runner, `status`, `table`, `eval` and the trainer all read and write run folders through
this module, so its writers and readers cannot drift apart (tests/test_runs.py, test_runner.py and test_eval.py write and read them through it).

    <run>/
      run.json              RunRecord: the resolved spec, its identity hash, who planned the run
                            (ablation, variant, seed, grid, factors, paper row, profile); `version`
      spec.json             the resolved spec the trainer last ran (its identity is checked on every start)
      log.jsonl             one row every train.log_every steps
      loss.png
      checkpoints/
        last.pt             the newest training checkpoint (atomic)
        step-00000600.pt    kept checkpoints (train.keep_checkpoints, eval.steps, train.keep_every)
        index.json          CheckpointIndex: last step, kept steps, the run identity
      evals/<step-00000600-hash>/   one evaluation: a checkpoint step + sampling/evaluation settings
        eval.json           EvalRecord: step, settings (sample + eval sections), their hash
        metrics.json        the metrics; its presence (parsing) means the evaluation is done
        samples.png, per_sample.npz, distortion.json, distortion.png, chunks/ (while sampling)
      sessions.json         every session of work on the run: training (a start, a resume after a kill, a
                            SLURM requeue, a continuation to more steps) and evaluation without training
                            (`dimr-lab eval`, `run --eval-only`: kind "eval", its steps the checkpoints
                            evaluated): its kind, start, last sign of life, steps, outcome (running, done,
                            stopped, time_limit, failed), host, pid and SLURM job; with the restarts,
                            continuations, evaluation sessions and the wall time they add up to (SessionLog;
                            a damaged one is kept aside as sessions.damaged-<stamp>[-N].json before any write)
      local.json, slurm.json, output.log     (runners) the process or SLURM jobs that trained it
      .lock                 held by every writer (train, the ablation worker, eval)

Folders written by older versions (a `metrics.json` beside `run.json`, no `evals/`) read as one
evaluation at their last step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import itertools
import json
import math
import os
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from dimr_lab.atomic import atomic_write_text, make_dirs
from dimr_lab.errors import UserError

RUN_RECORD = "run.json"
SPEC = "spec.json"
LOG = "log.jsonl"
LOSS_PLOT = "loss.png"
CHECKPOINTS = "checkpoints"
LAST = "last.pt"
INDEX = "index.json"
EVALS = "evals"
EVAL_RECORD = "eval.json"
METRICS = "metrics.json"
SAMPLES = "samples.png"
PER_SAMPLE = "per_sample.npz"
CHUNKS = "chunks"
LOCAL = "local.json"
SESSIONS = "sessions.json"
SLURM = "slurm.json"
OUTPUT_LOG = "output.log"
LOCK = ".lock"

RECORD_VERSION = 2
SPEC_FORMAT = "dimr-lab-spec/1"
MAX_JSON_BYTES = 16 * 1024 * 1024


# ------------------------------------------------------------------------------------------- json files

def read_json(path: Path, *, what: str = "JSON file") -> Any:
    """The JSON in a regular file of sane size; UserError naming the file for anything else
    (missing, not a regular file, too large, not UTF-8, not JSON, NaN constants)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror or err})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: not a regular file")
    if st.st_size > MAX_JSON_BYTES:
        raise UserError(f"{path}: {st.st_size} bytes is too large for a {what}")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if not text.strip():
        raise UserError(f"{path}: empty")

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(text, parse_constant=no_constants)
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def read_json_object(path: Path, *, what: str = "JSON file") -> dict[str, Any]:
    data = read_json(path, what=what)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def try_read_json_object(path: Path) -> dict[str, Any] | None:
    """The object in path, or None when it is missing or unusable (callers that only peek)."""
    try:
        return read_json_object(path)
    except UserError:
        return None


def jsonable(obj: Any) -> Any:
    """Plain JSON types (numpy/torch scalars to numbers, tuples to lists; NaN and inf to None)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", getattr(obj, "dim", lambda: 0)) in (0,):
        obj = obj.item()
    elif hasattr(obj, "tolist") and callable(obj.tolist):
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, data: Any) -> None:
    """Atomically: readers see the old file or the new one."""
    atomic_write_text(path, json.dumps(jsonable(data), indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------ records

def _typed(data: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any, path: Path) -> Any:
    value = data.get(name, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise UserError(f"{path}: '{name}' must be {getattr(kind, '__name__', kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise UserError(f"{path}: '{name}' must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


@dataclass
class RunRecord:
    """run.json: a planned run (written by the runner before training) or a run `train` made."""

    spec: dict[str, Any]                 # the resolved run spec (to_dict)
    identity: str                        # hash of the spec's identity (the folder name's last part)
    ablation: str = ""
    title: str = ""
    variant: str = ""
    variant_index: int = 0
    seed: int = 0
    grid: dict[str, Any] = field(default_factory=dict)
    factors: dict[str, Any] = field(default_factory=dict)
    paper: dict[str, Any] | None = None  # {table, row} or {table, model[, epochs]}
    baseline: str = ""
    profile: str = ""
    ablation_file: str = ""
    executor: str = ""
    created: float = 0.0
    reused_from: str = ""                # <ablation>/<folder> whose trained state was copied here (runner.reuse)
    version: int = RECORD_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path) -> "RunRecord":
        """A record from parsed JSON; a field of the wrong type is one UserError naming it."""
        kinds: dict[str, tuple[type | tuple[type, ...], Any]] = {
            "spec": (dict, None), "identity": (str, ""), "ablation": (str, ""), "title": (str, ""),
            "variant": (str, ""), "variant_index": (int, 0), "seed": (int, 0), "grid": (dict, {}),
            "factors": (dict, {}), "paper": (dict, None), "baseline": (str, ""), "profile": (str, ""),
            "ablation_file": (str, ""), "executor": (str, ""), "created": ((int, float), 0.0),
            "reused_from": (str, ""), "version": (int, 1),
        }
        values = {k: _typed(data, k, kind, default, path) for k, (kind, default) in kinds.items()}
        if values["spec"] is None:
            raise UserError(f"{path}: no resolved spec")
        if not values["identity"]:  # version 1 records: 'spec_hash'
            values["identity"] = _typed(data, "spec_hash", str, "", path)
        values["created"] = float(values["created"]) if math.isfinite(float(values["created"])) else 0.0
        return cls(**values)


@dataclass
class CheckpointIndex:
    """checkpoints/index.json: the last saved step, the kept ones, and whose run they are."""

    last: int
    kept: list[int]
    identity: str
    updated: float = 0.0

    @classmethod
    def read(cls, path: Path) -> "CheckpointIndex | None":
        data = try_read_json_object(path)
        if data is None:
            return None
        last, kept, ident = data.get("last"), data.get("kept"), data.get("identity")
        if isinstance(last, bool) or not isinstance(last, int) or not isinstance(kept, list) \
                or not all(isinstance(k, int) and not isinstance(k, bool) for k in kept) or not isinstance(ident, str):
            return None
        updated = data.get("updated")
        return cls(last, sorted(kept), ident, float(updated) if isinstance(updated, (int, float)) else 0.0)

    def write(self, path: Path) -> None:
        write_json(path, {"last": self.last, "kept": sorted(self.kept), "identity": self.identity,
                          "updated": time.time()})


def eval_name(step: int, eval_hash: str) -> str:
    """The folder of one evaluation: step-00000600-1a2b3c4d."""
    return f"step-{step:08d}-{eval_hash}"


def kept_name(step: int) -> str:
    return f"step-{step:08d}.pt"


@dataclass
class Evaluation:
    """One evaluation of a run, read back: its step, settings and metrics (None while unfinished)."""

    path: Path
    step: int
    name: str
    eval_hash: str
    settings: dict[str, Any]             # {"sample": {...}, "eval": {...}}
    metrics: dict[str, Any] | None
    problem: str = ""                    # why metrics is None when the evaluation looks finished

    @property
    def done(self) -> bool:
        return self.metrics is not None

    def serves(self, enabled: bool) -> bool:
        """Finished, and with metrics where `enabled` (eval.enabled) asks for them: an evaluation made with
        evaluation off (a sample grid only) shares its name with the full one, which it does not stand for."""
        return self.done and not (enabled and self.metrics.get("enabled") is False)


# ------------------------------------------------------------------------------------------- a folder

class RunDir:
    """The paths of one run folder and reads of its state (nothing here imports torch)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # paths
    @property
    def record_path(self) -> Path:
        return self.path / RUN_RECORD

    @property
    def spec_path(self) -> Path:
        return self.path / SPEC

    @property
    def log_path(self) -> Path:
        return self.path / LOG

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST

    @property
    def index_path(self) -> Path:
        return self.checkpoints / INDEX

    def kept_checkpoint(self, step: int) -> Path:
        return self.checkpoints / kept_name(step)

    @property
    def evals(self) -> Path:
        return self.path / EVALS

    def eval_dir(self, step: int, eval_hash: str) -> Path:
        return self.evals / eval_name(step, eval_hash)

    # records
    def read_record(self) -> RunRecord:
        return RunRecord.from_json(read_json_object(self.record_path, what="run record"), self.record_path)

    def write_record(self, record: RunRecord) -> None:
        write_json(self.record_path, record.to_json())

    def read_spec_document(self) -> dict[str, Any]:
        """spec.json's resolved spec (plain data)."""
        doc = read_json_object(self.spec_path, what="spec file")
        spec = doc.get("spec")
        if not isinstance(spec, dict):
            raise UserError(f"{self.spec_path}: not a dimr-lab spec file (no 'spec' object)")
        return spec

    def write_spec_document(self, resolved: dict[str, Any], identity: str) -> None:
        from dimr_lab import __version__

        write_json(self.spec_path, {"format": SPEC_FORMAT, "dimr_lab": __version__, "identity": identity,
                                    "spec": resolved})

    def spec_data(self) -> dict[str, Any]:
        """The resolved spec of this run: spec.json (what trained), else run.json's (what was planned)."""
        if self.spec_path.exists():
            return self.read_spec_document()
        return self.read_record().spec

    def index(self) -> CheckpointIndex | None:
        return CheckpointIndex.read(self.index_path)

    def trained_step(self) -> int | None:
        """The step of the newest checkpoint (from the index, written after every save)."""
        idx = self.index()
        return idx.last if idx else None

    def available_steps(self) -> list[int]:
        """Steps with a checkpoint to evaluate: the kept ones and the last."""
        idx = self.index()
        if idx is None:
            return []
        steps = {s for s in idx.kept if self.kept_checkpoint(s).exists()}
        if self.last_checkpoint.exists():
            steps.add(idx.last)
        return sorted(steps)

    def kept_on_disk(self) -> list[int]:
        """Steps of the kept checkpoint files present (whatever the index says)."""
        steps = []
        for p in self.checkpoints.glob("step-*.pt"):
            digits = p.name[len("step-"):-len(".pt")]
            if digits.isdigit() and p.name == kept_name(int(digits)):
                steps.append(int(digits))
        return sorted(steps)

    def checkpoint_for(self, step: int) -> Path | None:
        """The checkpoint file holding `step`: a kept one, or last.pt when it is at that step."""
        if self.kept_checkpoint(step).exists():
            return self.kept_checkpoint(step)
        idx = self.index()
        if idx is not None and idx.last == step and self.last_checkpoint.exists():
            return self.last_checkpoint
        return None

    def outputs_without_checkpoint(self, first_checkpoint_step: int) -> str | None:
        """Why this folder cannot go on, or None: it holds a trained run's outputs (finished evaluations, or
        a log past the step of the run's first checkpoint) but no checkpoint to train on or evaluate from,
        as a committed results/ tree does. Starting over there would cut its log back to step 0 and train
        again over what it holds; a run killed before its first checkpoint has neither and starts over."""
        if self.last_checkpoint.exists() or self.kept_on_disk():
            return None
        done = sorted({e.step for e in self.evaluations() if e.done})
        logged = self.last_logged_step()
        if not done and (logged is None or logged <= first_checkpoint_step):
            return None
        held = (f"evaluations at step {', '.join(map(str, done))}" if done else f"a log to step {logged}")
        return (f"{self.path}: holds a trained run's outputs ({held}) but no checkpoint to train on or evaluate "
                f"from (results folders keep outputs only); run it where its checkpoints are, or move the folder "
                f"away to train it again from step 0")

    def stop_detail(self, steps: int, *, sessions: list[dict[str, Any]] | None = None) -> str:
        """Where a run stopped early (a stop request, train.time_limit_s) was, for `run` and `status`: 'stopped
        at step 117 by train.time_limit_s; rerun to resume', or 'stopped evaluating step 300 (32 of 64 samples
        made); rerun to resume' once trained to `steps`. `sessions`: the rows of sessions.json when the caller
        has read them already (read here otherwise)."""
        step = self.trained_step()
        if step is None:
            return "stopped before its first checkpoint; rerun to start it"
        sessions = self.sessions() if sessions is None else sessions
        why = " by train.time_limit_s" if sessions and sessions[-1].get("outcome") == "time_limit" else ""
        where = f"at step {step} after a checkpoint"
        if step >= steps:
            open_ = [e for e in self.evaluations() if not e.done and not e.problem and e.step <= step]
            if open_:
                ev = open_[-1]
                made = sum(_chunk_size(p.name) for p in (ev.path / CHUNKS).glob("chunk-*.npz"))
                total = ev.settings.get("eval", {}).get("samples") if isinstance(ev.settings.get("eval"), dict) \
                    else None
                said = f" ({made} of {total} samples made)" if isinstance(total, int) and made else ""
                where = f"evaluating step {ev.step}{said}"
        return f"stopped {where}{why}; rerun to resume"

    # evaluations
    def evaluations(self) -> list[Evaluation]:
        """Every evaluation of this run (finished or not), by step then name."""
        out = []
        if self.evals.is_dir():
            for d in sorted(p for p in self.evals.iterdir() if p.is_dir() and not p.name.startswith(".")):
                ev = read_evaluation(d)
                if ev is not None:
                    out.append(ev)
        legacy = self.path / METRICS
        if legacy.exists():
            out.extend(self._legacy_evaluation(legacy))
        return sorted(out, key=lambda e: (e.step, e.name))

    def _legacy_evaluation(self, path: Path) -> list[Evaluation]:
        """A version-1 folder's metrics.json as one evaluation at its last step."""
        try:
            metrics = read_json_object(path, what="metrics file")
        except UserError as err:
            return [Evaluation(path.parent, -1, "final", "", {}, None, str(err))]
        try:
            spec = self.spec_data()
        except UserError:
            spec = {}
        step = metrics.get("steps")
        step = step if isinstance(step, int) and not isinstance(step, bool) else -1
        settings = {"sample": spec.get("sample", {}), "eval": spec.get("eval", {})}
        return [Evaluation(path.parent, step, "final", "", settings, metrics)]

    def find_evaluation(self, step: int, eval_hash: str) -> Evaluation | None:
        d = self.eval_dir(step, eval_hash)
        return read_evaluation(d) if d.is_dir() else None

    def unfinished_evaluations(self, spec: Any, steps: list[int] | None = None, *,
                               evaluations: list[Evaluation] | None = None) -> list[int]:
        """The steps (spec.eval_steps() unless given) whose evaluation with spec's settings has not finished;
        `evaluations`: this folder's evaluations() where the caller has read them already (not read again)."""
        ehash = spec.eval_hash()
        if evaluations is None:
            def find(step: int) -> Evaluation | None:
                return self.find_evaluation(step, ehash)
        else:
            by_path = {ev.path: ev for ev in evaluations}

            def find(step: int) -> Evaluation | None:
                return by_path.get(self.eval_dir(step, ehash))
        return [s for s in (spec.eval_steps() if steps is None else steps)
                if (ev := find(s)) is None or not ev.serves(spec.eval.enabled)]

    # log
    def log_rows(self, *, tail_bytes: int | None = None) -> list[dict[str, Any]]:
        """The rows of log.jsonl that parse (undecodable bytes and torn lines are skipped)."""
        return read_jsonl(self.log_path, tail_bytes=tail_bytes)

    def last_logged_step(self) -> int | None:
        for row in reversed(self.log_rows(tail_bytes=16384)):
            if isinstance(row.get("step"), int):
                return row["step"]
        return None

    # sessions
    @property
    def sessions_path(self) -> Path:
        return self.path / SESSIONS

    def sessions(self) -> list[dict[str, Any]]:
        """The sessions sessions.json records (training and evaluation), oldest first ([] when it is missing or
        unusable)."""
        return _session_rows(try_read_json_object(self.sessions_path))


def _session_rows(data: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = data.get("sessions") if isinstance(data, dict) else None
    return [s for s in rows if _is_session(s)] if isinstance(rows, list) else []


def _is_session(s: Any) -> bool:
    return isinstance(s, dict) and all(isinstance(s.get(k), (int, float)) and not isinstance(s.get(k), bool)
                                       and math.isfinite(s[k]) for k in ("started", "last"))


def keep_damaged_sessions_aside(path: Path, say: Callable[[str], None], then: str | None = None
                                ) -> list[dict[str, Any]]:
    """The sessions of the sessions.json at `path` ([] when there is none), read by a writer about to replace
    it. A damaged one (not JSON, not an object with a list under "sessions", or rows in that list that are not
    sessions) is renamed aside first, as sessions.damaged-<stamp>[-N].json (never over an earlier one), and `say`
    gets one line naming both and `then`, what the writer does next (None: the sessions that still read carry
    over, or start again from this one); the sessions that read are returned. Every writer of sessions.json
    (SessionLog, for training and evaluation sessions alike) goes through here."""
    try:
        data: Any = read_json(path, what="sessions file")
    except UserError:
        if not path.exists():
            return []
        data, why = None, "not readable"
    else:
        rows = data.get("sessions") if isinstance(data, dict) else None
        if not isinstance(data, dict):
            why = f"not a JSON object (a {type(data).__name__})"
        elif not isinstance(rows, list):
            why = "no list under 'sessions'"
        elif bad := sum(not _is_session(s) for s in rows):
            why = f"{bad} of its {len(rows)} rows not a session (numbers 'started' and 'last')"
        else:
            return rows
    kept = _session_rows(data)
    if then is None:
        then = (f"its {len(kept)} readable session{'s' if len(kept) != 1 else ''} carried over" if kept
                else "the sessions start again from this one")
    stamp = int(time.time())
    aside = next(a for n in itertools.count() if not (a := path.with_name(
        f"sessions.damaged-{stamp}{f'-{n}' if n else ''}.json")).exists())  # never over an earlier one
    with contextlib.suppress(OSError):  # kept aside, not written over (a rename that fails: the write goes on)
        os.replace(path, aside)
        say(f"{path}: {why}; kept as {aside.name}, {then}")
    return kept


SESSION_KINDS = ("start", "resume", "continue", "eval")


def _session_kind(i: int, s: dict[str, Any]) -> str:
    """'start', 'resume' (after a kill, a stop, a failure, a SLURM requeue) or 'continue' (new work on a run
    whose previous training session had finished: a larger train.steps, more evaluations) for a training
    session; 'eval' for an evaluation without training (`dimr-lab eval`, `run --eval-only`). Rows without a kind
    (written before it was recorded) read as a resume after the first, and the first too when it resumed a
    checkpoint."""
    kind = s.get("kind")
    if kind in SESSION_KINDS:
        return kind
    return "resume" if i or s.get("resumed") else "start"


def session_totals(sessions: list[dict[str, Any]]) -> dict[str, Any]:
    """{sessions, restarts, continuations, evaluations, wall_s, eval_wall_s}: a restart is a training session
    that picked up an interrupted one (or, first, a checkpoint that sessions before any record made), a
    continuation one that went on from a finished training session, an evaluation a session that only
    evaluated; wall_s sums every session (evaluations too; eval_wall_s those alone) from its start to its last
    sign of life (a killed session's time after that is not counted)."""
    if not sessions:
        return {"sessions": 0, "restarts": 0, "continuations": 0, "evaluations": 0, "wall_s": None,
                "eval_wall_s": None}
    kinds = [_session_kind(i, s) for i, s in enumerate(sessions)]
    walls = [max(0.0, float(s["last"]) - float(s["started"])) for s in sessions]
    return {"sessions": len(sessions), "restarts": kinds.count("resume"), "continuations": kinds.count("continue"),
            "evaluations": kinds.count("eval"), "wall_s": round(sum(walls), 3),
            "eval_wall_s": round(sum(w for w, k in zip(walls, kinds) if k == "eval"), 3)}


class SessionLog:
    """Appends this process's session to sessions.json and keeps its end up to date (rank 0, under the run's
    lock): `begin` when training starts or resumes (or, kind "eval", an evaluation without training begins),
    `touch` as it makes progress (written at most every TOUCH_S seconds unless forced: a checkpoint, an
    evaluation), `end` with how it ended. A session killed
    without an end keeps outcome 'running' and the time of its last touch."""

    TOUCH_S = 10.0

    def __init__(self, run: RunDir, say: Callable[[str], None] | None = None):
        self.run = run
        self.say = say or (lambda line: None)
        self.rows: list[dict[str, Any]] | None = None
        self._written = 0.0

    def begin(self, *, step: int, resumed: bool, processes: int = 1, started: float | None = None,
              kind: str | None = None) -> None:
        """A new session from `step` (`resumed`: from a checkpoint), begun at `started` (now when None: the
        trainer passes the time it began building, so that loading data and the network count). A training
        session's kind (None) follows from `resumed` and the previous training session; kind "eval" is an
        evaluation without training, its steps the checkpoints it evaluates."""
        if kind is not None and kind not in SESSION_KINDS:
            raise ValueError(f"session kind {kind!r}: one of {', '.join(SESSION_KINDS)}")
        from dimr_lab.provenance import machine

        rows = keep_damaged_sessions_aside(self.run.sessions_path, self.say)
        job = os.environ.get("SLURM_JOB_ID")
        if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"  # as slurm.json names it
        restart = os.environ.get("SLURM_RESTART_COUNT", "")
        now = time.time()
        # after a training session that finished its work (trained and evaluated) this one continues the run: no
        # restart; evaluation sessions between them change nothing of that
        trained = [r for r in rows if r.get("kind") != "eval"]
        if kind is None:
            kind = "start" if not resumed else "continue" if trained and trained[-1].get("outcome") == "done" \
                else "resume"
        rows.append({"started": now if started is None else started, "last": now, "outcome": "running",
                     "kind": kind, "from_step": step, "to_step": step, "resumed": resumed,
                     "host": socket.gethostname(),
                     "pid": os.getpid(), "job_id": job, "slurm_restart": int(restart) if restart.isdigit() else None,
                     "processes": processes, "machine": machine()})
        self.rows = rows
        self._write()

    def touch(self, step: int, *, force: bool = False) -> None:
        if self.rows is None:
            return
        self.rows[-1]["to_step"] = step
        self.rows[-1]["last"] = time.time()
        if force or time.monotonic() - self._written >= self.TOUCH_S:
            self._write()

    def end(self, outcome: str, step: int) -> None:
        if self.rows is None:
            return
        self.rows[-1]["outcome"] = outcome
        self.touch(step, force=True)
        self.rows = None

    def _write(self) -> None:
        assert self.rows is not None
        with contextlib.suppress(OSError):  # a record of the run, never the reason it fails (a full disk stops
            # it at its next checkpoint, with its own message)
            # the file was read at begin(); one damaged since is kept aside before this session's record replaces it
            keep_damaged_sessions_aside(self.run.sessions_path, self.say,
                                        "written again from what this session read at its start")
            totals = session_totals(self.rows)
            write_json(self.run.sessions_path, {"sessions": self.rows, "restarts": totals["restarts"],
                                                "continuations": totals["continuations"],
                                                "evaluations": totals["evaluations"], "wall_s": totals["wall_s"],
                                                "eval_wall_s": totals["eval_wall_s"]})
        self._written = time.monotonic()


def _chunk_size(name: str) -> int:
    """The samples a chunk file holds, from its name (chunk-000000016-000000032.npz: 16); 0 for another name."""
    parts = name[:-len(".npz")].split("-") if name.endswith(".npz") else []
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return max(0, int(parts[2]) - int(parts[1]))
    return 0


def _named_step(d: Path) -> int:
    """The step in an evaluation folder's name (step-00000600-<hash>), -1 when it has none."""
    digits = d.name[len("step-"):].split("-", 1)[0] if d.name.startswith("step-") else ""
    return int(digits) if digits.isdigit() else -1


def read_evaluation(d: Path) -> Evaluation | None:
    """The evaluation in folder d (None when it has no eval.json: not an evaluation; one with a problem when
    its eval.json does not read, with the step its folder's name gives)."""
    if not (d / EVAL_RECORD).exists():
        return None
    try:
        rec = read_json_object(d / EVAL_RECORD, what="evaluation record")
    except UserError as err:
        return Evaluation(d, _named_step(d), d.name, "", {}, None, str(err))
    step, ehash, settings = rec.get("step"), rec.get("eval_hash"), rec.get("settings")
    if isinstance(step, bool) or not isinstance(step, int) or not isinstance(ehash, str) \
            or not isinstance(settings, dict):
        return Evaluation(d, _named_step(d), d.name, "", {}, None, f"{d / EVAL_RECORD}: not an evaluation record")
    metrics, problem = None, ""
    if (d / METRICS).exists():
        try:
            metrics = read_json_object(d / METRICS, what="metrics file")
        except UserError as err:
            problem = str(err)
    return Evaluation(d, step, d.name, ehash, settings, metrics, problem)


def write_eval_record(d: Path, step: int, eval_hash: str, settings: dict[str, Any], checkpoint: str) -> None:
    write_json(d / EVAL_RECORD, {"version": RECORD_VERSION, "step": step, "eval_hash": eval_hash,
                                 "settings": settings, "checkpoint": checkpoint, "created": time.time()})


def read_jsonl(path: Path, *, tail_bytes: int | None = None) -> list[dict[str, Any]]:
    """Objects of a JSON-lines file; lines that do not decode or parse are skipped."""
    try:
        with open(path, "rb") as f:
            if tail_bytes is not None:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - tail_bytes))
            raw = f.read()
    except OSError:
        return []
    rows = []
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def tail_lines(path: Path, n: int = 8, nbytes: int = 16384) -> list[str]:
    """The last n non-empty lines of a text file ([] when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - nbytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [ln.rstrip() for ln in text.splitlines() if ln.strip()][-n:]


# ----------------------------------------------------------------------------------- SLURM jobs

# slurm.json is read here, not in dimr_lab.runner.slurm, so that `status` of runs never sent to SLURM does not
# import submitit


def latest_job(run_dir: Path) -> dict[str, Any] | None:
    """The last job slurm.json records for a run (a dict with its job_id), or None."""
    info = try_read_json_object(Path(run_dir) / SLURM)
    jobs = info.get("jobs") if isinstance(info, dict) else None
    job = jobs[-1] if isinstance(jobs, list) and jobs and isinstance(jobs[-1], dict) else None
    return job if job is not None and isinstance(job.get("job_id"), str) else None


def all_jobs(run_dir: Path) -> list[str]:
    """Every job id slurm.json records for a run, oldest first."""
    info = try_read_json_object(Path(run_dir) / SLURM)
    jobs = info.get("jobs") if isinstance(info, dict) else None
    return [j["job_id"] for j in (jobs if isinstance(jobs, list) else [])
            if isinstance(j, dict) and isinstance(j.get("job_id"), str)]


# ----------------------------------------------------------------------------------- finding runs

SKIP_DIRS = {EVALS, CHECKPOINTS, CHUNKS}


def is_run_folder(path: Path) -> bool:
    return (path / RUN_RECORD).is_file() or (path / SPEC).is_file()


def find_runs(root: str | Path, *, max_depth: int = 4) -> list[Path]:
    """Run folders (holding run.json or spec.json) at or below root; hidden folders and a run's own
    sub-folders are not searched."""
    root = Path(root)
    if is_run_folder(root):
        return [root]
    found = []
    for here, dirs, _files in os.walk(root):
        depth = len(Path(here).relative_to(root).parts)
        if depth and is_run_folder(Path(here)):
            found.append(Path(here))
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS) if depth < max_depth else []
    return sorted(found)


# -------------------------------------------------------------------------------------------- locks

class RunBusy(UserError):
    """Another process holds the run folder."""


def lock_holder(run_dir: Path) -> str:
    try:
        text = (Path(run_dir) / LOCK).read_text(errors="replace").strip()
    except OSError:
        return "another process"
    parts = text.split()
    if len(parts) >= 2:
        return f"pid {parts[1]} on host {parts[0]}"
    return "another process"


@contextlib.contextmanager
def run_lock(run_dir: str | Path, *, wait_s: float = 0.0, purpose: str = "train") -> Iterator[None]:
    """Hold run_dir/.lock (flock) for the duration; RunBusy ("in use by pid N on host H") when another
    process holds it after `wait_s` seconds. A dead holder's lock is free (the kernel drops it with the
    process), so a stale lock file never blocks."""
    run_dir = Path(run_dir)
    try:
        make_dirs(run_dir)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise UserError(f"{run_dir}: cannot create the run folder's lock ({err.strerror or err})") from None
    got = False
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                got = True
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                if time.monotonic() >= deadline:
                    holder = lock_holder(run_dir)
                    for _ in range(10):  # the holder writes its name just after it takes the lock
                        if holder != "another process":
                            break
                        time.sleep(0.05)
                        holder = lock_holder(run_dir)
                    raise RunBusy(f"{run_dir}: in use by {holder} (it holds {LOCK}); "
                                  f"wait for it or stop it first") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()} {purpose}\n".encode())
        yield
    finally:
        if got:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def is_locked(run_dir: str | Path) -> bool:
    """Whether some process holds run_dir/.lock now (this host's view)."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def pid_alive(pid: Any) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2**22 * 1024:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the `.NAME.*.tmp` files an interrupted atomic write left in folder (call under the lock)."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed
