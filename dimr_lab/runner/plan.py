"""An ablation expanded into runs: variants x grid points x seeds, each with its resolved spec and folder.

A run is base <- profile <- variant <- variant.profile <- grid point <- --set overrides <- train.seed = seed;
its folder is `<results>/<ablation>/<variant>-s<seed>-<identity>` (dimr_lab.rundir), where the identity
hashes what the run trains: the same command with more steps or other evaluation settings plans the same
folder, which continues (or is evaluated again) instead of training from scratch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dimr_lab.errors import SpecError
from dimr_lab.rundir import RunDir, RunRecord
from dimr_lab.spec.ablation import (DEFAULT_PROFILE, Ablation, check_seeds, grid_points, resolve, variant_layers)
from dimr_lab.spec.run_spec import RunSpec
from dimr_lab.spec.schema import to_dict


@dataclass
class PlannedRun:
    """One run of an ablation: a variant at one grid point and one seed, with its resolved spec."""

    ablation: str
    variant: str
    seed: int
    grid: dict[str, Any]
    factors: dict[str, Any]
    paper: dict[str, Any] | None     # {"table": ..., "row": ...} where the variant mirrors a paper row
    profile: str
    spec: RunSpec
    identity: str
    run_dir: Path
    title: str = ""
    baseline: str = ""
    ablation_file: str = ""
    variant_index: int = 0  # the variant's place in the file (the table keeps that order)
    reused_from: str = ""   # set when the runner copied a trained folder of the same identity (runner.reuse)
    # `run --eval-only`: the plan run.json records (the file's, without the command line's sample./eval.
    # settings); a readable run.json is then left as it is, and the worker gets record_overrides()
    recorded: RunSpec | None = None

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def folder(self) -> RunDir:
        return RunDir(self.run_dir)

    def record(self, executor: str = "") -> RunRecord:
        """What run.json holds for this run."""
        return RunRecord(spec=to_dict(self.spec), identity=self.identity, ablation=self.ablation, title=self.title,
                         variant=self.variant, variant_index=self.variant_index, seed=self.seed, grid=self.grid,
                         factors=self.factors, paper=self.paper, baseline=self.baseline, profile=self.profile,
                         ablation_file=self.ablation_file, executor=executor, created=time.time(),
                         reused_from=self.reused_from)

    def record_overrides(self) -> list[tuple[str, Any]]:
        """The settings (section.key, value) where this run's spec differs from what its folder's run.json
        records: what a worker applies to the record when `run --eval-only` leaves it as it was. [] when they
        agree or the record does not read (it is then written as planned)."""
        from dimr_lab.errors import UserError
        from dimr_lab.spec.run_spec import load_run_spec

        try:
            recorded = to_dict(load_run_spec(self.folder.read_record().spec, file=str(self.folder.record_path)))
        except (UserError, OSError):
            return []
        return [(f"{section}.{key}", value) for section, values in to_dict(self.spec).items()
                for key, value in values.items() if recorded.get(section, {}).get(key) != value]

    def pending_evaluations(self) -> list[int]:
        """The steps whose evaluation (with this run's settings) has not finished."""
        from dimr_lab.runner.worker import pending_evaluations

        return pending_evaluations(self.spec, self.run_dir)

    def is_done(self) -> bool:
        """Trained to its steps and every evaluation it asks for has parsing metrics."""
        return not self.pending_evaluations()

    def cannot_continue(self) -> str | None:
        """Why this run, not done, cannot go on in its folder (RunDir.outputs_without_checkpoint), or None."""
        if not self.run_dir.is_dir() or self.is_done():
            return None
        blocked = self.folder.outputs_without_checkpoint(self.spec.first_checkpoint_step())
        if not blocked:
            return None
        # what keeps such a run from being done may be a damaged file, not a missing evaluation: name it
        damaged = [e.problem for e in self.folder.evaluations() if e.problem and e.step in self.spec.eval_steps()]
        if damaged:
            return (f"{damaged[0]}: an evaluation this run asks for is damaged, and its folder keeps no checkpoint "
                    f"to evaluate again from (results folders keep outputs only); restore the file from where it "
                    f"came from")
        return blocked


def split_top_level(text: str) -> list[str]:
    """text split at the commas outside brackets, braces and quotes: '[1,2],[3,4]' -> ['[1,2]', '[3,4]']."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def grid_overrides(items: list[str] | None) -> tuple[list[str], list[tuple[str, list[Any]]]]:
    """Split `--set` items into plain ones and grids: `key=a,b,c` (not a TOML value, with commas) is the
    values a, b, c of a grid over key, each read as a TOML value ('1e-3,3e-4' -> [0.001, 0.0003]); quote a
    string that holds commas ('key="a,b"'). slurm.* keys are never grids."""
    import tomllib

    from dimr_lab.spec.schema import parse_value

    plain, grid = [], []
    for item in items or []:
        key, eq, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        is_toml = True
        try:
            tomllib.loads(f"v = {raw}")
        except tomllib.TOMLDecodeError:
            is_toml = False
        if eq and not is_toml and "," in raw and not key.startswith(("slurm.", "ablation.")):
            values = [parse_value(v.strip()) for v in split_top_level(raw) if v.strip()]
            if len({repr(v) for v in values}) != len(values):
                raise SpecError(f"duplicate values in {raw!r}", file="--set", key=key)
            grid.append((key, values))
        else:
            plain.append(item)
    return plain, grid


def split_overrides(overrides: list[tuple[str, Any]] | None) -> tuple[list[tuple[str, Any]], dict[str, Any],
                                                                       list[int] | None]:
    """--set items -> (run-spec overrides, slurm settings, seeds): keys `slurm.X` set [slurm] X and
    `ablation.seeds` replaces the seeds; every other key overrides the run spec."""
    run, slurm, seeds = [], {}, None
    for key, value in overrides or []:
        if key.startswith("slurm."):
            slurm[key[len("slurm."):]] = value
        elif key == "ablation.seeds":
            seeds = check_seeds(value, file="--set", key=key)
        elif key.startswith("ablation."):
            raise SpecError("only ablation.seeds can be set from the command line", file="--set", key=key)
        elif key == "train.seed":
            raise SpecError("train.seed is set per run from the seeds; use --set ablation.seeds=[0,1]",
                            file="--set", key=key)
        else:
            run.append((key, value))
    return run, slurm, seeds


def expand(abl: Ablation, profile: str = DEFAULT_PROFILE, overrides: list[tuple[str, Any]] | None = None, *,
           results: str | Path = "results", seeds: list[int] | None = None, only: list[str] | None = None,
           grid: list[tuple[str, list[Any]]] | None = None) -> list[PlannedRun]:
    """variants x grid points (the file's x `grid`, e.g. from `--set key=a,b`) x seeds -> planned runs,
    every spec resolved and validated."""
    file = str(abl.file)
    seeds = check_seeds(seeds, file="--set", key="ablation.seeds") if seeds is not None else abl.seeds_for(profile)
    overrides = list(overrides or [])
    for k, _ in overrides:
        if k == "train.seed":
            raise SpecError("train.seed is set per run from the seeds; use --seeds or --set ablation.seeds=[0,1]",
                            file="--set", key=k)
    abl.profile_items(profile)  # an unknown profile fails here
    for key, values in grid or []:  # a grid from `--set key=a,b`: its values' errors name --set, not the file
        for value in values:
            resolve(abl, [("--set", [(key, value)])])
    variants = list(abl.variants)
    if only:
        names = [v.name for v in variants]
        for name in only:
            if name not in names:
                from dimr_lab.errors import closest

                hint = closest(name, names)
                raise SpecError(f"no variant named {name!r}; variants: {', '.join(names)}"
                                + (f" (did you mean {hint!r}?)" if hint else ""), file="--only", key=name)
        variants = [v for v in variants if v.name in only]
    results_root = Path(results).resolve()
    ablation_dir = results_root / abl.name
    _check_inside(ablation_dir, results_root, file, "ablation.name")
    runs: list[PlannedRun] = []
    for v in variants:
        index = abl.variants.index(v)
        for point in grid_points(abl, grid):
            layers = variant_layers(abl, v, profile, point)
            if overrides:
                resolve(abl, layers + [("--set", overrides)])
            for i, seed in enumerate(seeds):  # the layers above the seed are checked one by one once
                spec = resolve(abl, layers + [("--set", overrides), ("seed", [("train.seed", seed)])],
                               prefix_resolved=i > 0)
                identity = spec.identity_hash()
                run_dir = ablation_dir / f"{v.name}-s{seed}-{identity}"
                _check_inside(run_dir, ablation_dir, file, f"variant {v.name!r}")
                paper = v.paper or ({"table": abl.paper_table, "row": abl.paper_rows[v.name]}
                                    if abl.paper_table and v.name in abl.paper_rows else None)
                runs.append(PlannedRun(ablation=abl.name, variant=v.name, seed=seed, grid=dict(point),
                                       factors=dict(v.factors), paper=paper, profile=profile, spec=spec,
                                       identity=identity, run_dir=run_dir, title=abl.title, baseline=abl.baseline,
                                       ablation_file=str(abl.file.resolve()), variant_index=index))
    seen: dict[Path, PlannedRun] = {}
    for r in runs:
        if r.run_dir in seen:
            raise SpecError(f"two runs train the same network into {r.run_dir.name} ({seen[r.run_dir].variant} "
                            f"{seen[r.run_dir].grid or ''} and {r.variant} {r.grid or ''}): they differ only in "
                            f"what is not part of a run's identity (steps, sampling, evaluation, logging); evaluate "
                            f"one run several ways with `dimr-lab eval` or `run --eval-only --set ...`", file=file,
                            key="variant")
        seen[r.run_dir] = r
    return runs


def _check_inside(path: Path, root: Path, file: str, key: str) -> None:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        raise SpecError(f"would write outside the results folder ({path})", file=file, key=key) from None
    if path.resolve() == root.resolve():
        raise SpecError(f"would write into the results folder itself ({path})", file=file, key=key)
