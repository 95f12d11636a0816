"""The ablation file: declare a study once, expand it into runs.

    [ablation]
    name = "tdln_vs_adaln"                 # the results folder: results/<name>/
    title = "TD-LN vs adaLN"               # optional
    description = "..."                    # optional
    seeds = [0, 1, 2]
    baseline = "tdln"                      # optional: the variant deltas are taken against (default: first)
    paper = { table = "table2_ablation_imagenet64", rows = { tdln = 4, adaln_zero = 3 } }   # optional

    [base]                                 # a run spec inline (as `dimr-lab train SPEC` reads) ...
    spec = "base.toml"                     # ... or a file relative to this one ("default": the built-in run),
    "train.steps" = 300                    #     plus dotted overrides or nested tables

    [[variant]]
    name = "adaln_zero"                    # ^[A-Za-z0-9][A-Za-z0-9_.-]*$, unique
    factors = { norm = "adaLN-Zero" }      # optional labels for the table
    paper = { table = "imagenet256", model = "DiMR-XL/2R", epochs = 800 }   # optional: this row's own
    "model.norm" = "adaln_zero"            # everything else: dotted overrides of the base
    [variant.profile.tiny]                 # optional: this variant's overrides under one profile
    "model.preset" = "dimr_tiny_3r"

    [grid]                                 # optional: the cartesian product of these values
    "train.lr" = [1e-3, 3e-4]

    [profile.tiny]                         # named sets of dotted overrides; --profile picks one
    "train.steps" = 300
    [profile.paper]
    "model.preset" = "dimr_m_3r"

    [slurm]                                # launcher settings for --executor slurm
    partition = "gpu"
    time_min = 240
    setup = ["module load cuda"]

A run is base <- profile <- variant <- variant.profile <- grid point <- --set overrides <- train.seed = seed; its folder is
`<results>/<ablation>/<variant>-s<seed>-<spec_hash>`. Everything is validated up front (`load_ablation`
and `expand`): a problem is one SpecError naming the file and the key. Specs are data: TOML only.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any

from dimr_lab.errors import SpecError, UserError, closest
from dimr_lab.spec.run_spec import RunSpec, load_run_spec, spec_hash
from dimr_lab.spec.schema import field, from_dict, load_toml, to_dict

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_NAME = 80
TOP_KEYS = ("ablation", "base", "variant", "grid", "profile", "slurm")
VARIANT_RESERVED = ("name", "factors", "description", "profile", "paper")
BUILTIN_BASE = "default"
DEFAULT_PROFILE = "tiny"


@dataclass
class SlurmSettings:
    """`[slurm]`: how `--executor slurm` submits the ablation's job array (flags: `--set slurm.KEY=V`)."""

    partition: str = field("", help="'' = the cluster's default partition")
    account: str = field("")
    qos: str = field("")
    time_min: int = field(60, min=1, help="time limit of one array task, minutes")
    nodes: int = field(1, min=1)
    gpus_per_node: int = field(0, min=0)
    tasks_per_node: int = field(1, min=1, help="one process per GPU for DDP")
    cpus_per_task: int = field(0, min=0, help="0 = the cluster's default")
    mem_gb: float = field(0.0, min=0.0, help="0 = the cluster's default")
    array_parallelism: int = field(64, min=1, help="array tasks running at once")
    signal_delay_s: int = field(120, min=1, help="USR2 this long before the time limit: checkpoint, requeue")
    max_requeues: int = field(10, min=0, help="timeouts a run may requeue itself after")
    job_name: str = field("", help="'' = dimr-<ablation>")
    constraint: str = field("")
    exclude: str = field("")
    setup: list[str] = field(default_factory=list, help="shell lines run before the task (module load ...)")

    def validate(self) -> None:
        for i, line in enumerate(self.setup):
            if "\n" in line:
                raise SpecError("one shell line per entry (no newlines)", key=f"setup[{i}]")


@dataclass
class _Header:
    name: str = field(help="the ablation's folder under the results directory")
    title: str = field("")
    description: str = field("")
    seeds: list[int] = field(default_factory=lambda: [0])
    baseline: str = field("", help="variant the table's deltas are taken against ('' = the first)")
    paper: dict = field(default_factory=dict, help="{ table = '...', rows = { variant = row } }")


@dataclass
class Variant:
    name: str
    overrides: list[tuple[str, Any]]
    factors: dict[str, Any]
    description: str = ""
    # [variant.profile.NAME]: overrides applied after the variant's own when profile NAME runs (a variant
    # that is a different network at the paper's scale and at the tiny one)
    profiles: dict[str, list[tuple[str, Any]]] = dc_field(default_factory=dict)
    paper: dict[str, Any] | None = None  # this variant's published row: {table, row} or {table, model, epochs}


@dataclass
class Ablation:
    file: Path
    name: str
    title: str
    description: str
    seeds: list[int]
    baseline: str
    paper_table: str | None
    paper_rows: dict[str, int]
    base: dict[str, Any]                 # raw run-spec data (before profile/variant)
    base_file: str                       # where the base came from (for messages)
    variants: list[Variant]
    grid: list[tuple[str, list[Any]]]
    profiles: dict[str, list[tuple[str, Any]]]
    slurm: SlurmSettings
    profile_slurm: dict[str, dict[str, Any]] = dc_field(default_factory=dict)   # "slurm.X" keys of profiles

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)


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
    spec_hash: str
    run_dir: Path
    title: str = ""
    baseline: str = ""
    ablation_file: str = ""
    variant_index: int = 0  # the variant's place in the file (the table keeps that order)

    @property
    def name(self) -> str:
        return self.run_dir.name

    def info(self) -> dict[str, Any]:
        """The content of run_dir/run.json (see dimr_lab.runner.state.write_run_info)."""
        return {
            "ablation": self.ablation,
            "title": self.title,
            "variant": self.variant,
            "variant_index": self.variant_index,
            "seed": self.seed,
            "grid": self.grid,
            "factors": self.factors,
            "paper": self.paper,
            "baseline": self.baseline,
            "profile": self.profile,
            "spec_hash": self.spec_hash,
            "ablation_file": self.ablation_file,
            "spec": to_dict(self.spec),
        }


# ----------------------------------------------------------------------------------------------- parsing

def _err(file: str, key: str | None, message: str) -> SpecError:
    return SpecError(message, file=file, key=key)


def check_name(value: Any, *, file: str, key: str, what: str) -> str:
    """A name that becomes a folder: ^[A-Za-z0-9][A-Za-z0-9_.-]*$, at most MAX_NAME characters."""
    if not isinstance(value, str):
        raise _err(file, key, f"expected a string, got {value!r}")
    if not value:
        raise _err(file, key, f"{what} must not be empty")
    if len(value) > MAX_NAME or not NAME_RE.match(value):
        raise _err(file, key, f"{what} {value!r} is not allowed: use letters, digits, '_', '.', '-' "
                              f"(starting with a letter or digit, at most {MAX_NAME} characters)")
    return value


def flatten(table: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """{'train': {'steps': 3}, 'model.norm': 'x'} -> [('train.steps', 3), ('model.norm', 'x')]"""
    out: list[tuple[str, Any]] = []
    for k, v in table.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.extend(flatten(v, key))
        else:
            out.append((key, v))
    return out


def _check_keys(table: dict[str, Any], allowed: tuple[str, ...], *, file: str, where: str) -> None:
    for k in table:
        if k not in allowed:
            hint = closest(k, allowed)
            raise _err(file, f"{where}.{k}" if where else k,
                       f"unknown key{f' in [{where}]' if where else ''}; allowed: {', '.join(allowed)}"
                       + (f" (did you mean {hint!r}?)" if hint else ""))


def _check_override_keys(items: list[tuple[str, Any]], *, file: str, where: str) -> None:
    for k, _ in items:
        parts = k.split(".")
        if not all(parts) or not all(p.strip() == p for p in parts):
            raise _err(file, f"{where}.{k}" if where else k, f"malformed dotted key {k!r}")
        if parts[0] == "train" and len(parts) == 2 and parts[1] == "seed":
            raise _err(file, f"{where}.{k}" if where else k,
                       "train.seed is set from [ablation].seeds; list the seeds there")


def _load_base(raw: Any, *, file: str, ablation_path: Path) -> tuple[dict[str, Any], str]:
    from dimr_lab.spec.defaults import DEFAULT_RUN

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _err(file, "base", f"expected a table, got {raw!r}")
    raw = copy.deepcopy(raw)
    ref = raw.pop("spec", None)
    if ref is None:
        data: dict[str, Any] = {}
        base_file = file
    elif not isinstance(ref, str) or not ref:
        raise _err(file, "base.spec", f"expected a path to a run spec (.toml) or {BUILTIN_BASE!r}, got {ref!r}")
    elif ref == BUILTIN_BASE:
        data, base_file = copy.deepcopy(DEFAULT_RUN), file
    else:
        path = Path(ref)
        if not path.is_absolute():
            path = ablation_path.parent / path
        if not path.is_file():
            raise _err(file, "base.spec", f"no such file: {path}" + (" (a directory)" if path.is_dir() else ""))
        try:
            data = load_toml(path)
        except UserError as err:
            raise _err(file, "base.spec", str(err)) from None
        base_file = str(path)
    for key, value in flatten(raw):
        _check_override_keys([(key, value)], file=file, where="base")
        from dimr_lab.spec.schema import set_dotted

        set_dotted(data, key, value, file=file)
    return data, base_file


def load_ablation(path: str | Path, *, check: bool = True) -> Ablation:
    """Parse and validate an ablation file. With `check`, every profile x variant x grid point is resolved
    through load_run_spec, so unknown components and keys fail here, before anything runs."""
    path = Path(path)
    file = str(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected an ablation file (.toml)")
    data = load_toml(path)
    _check_keys(data, TOP_KEYS, file=file, where="")
    if "ablation" not in data:
        raise _err(file, "ablation", "missing the [ablation] table (name, seeds, ...)")
    if not isinstance(data["ablation"], dict):
        raise _err(file, "ablation", f"expected a table, got {data['ablation']!r}")
    header = from_dict(_Header, data["ablation"], file=file, prefix="ablation")
    name = check_name(header.name, file=file, key="ablation.name", what="ablation name")
    if not header.seeds:
        raise _err(file, "ablation.seeds", "needs at least one seed")
    for i, s in enumerate(header.seeds):
        if s < 0:
            raise _err(file, f"ablation.seeds[{i}]", f"seeds are integers >= 0, got {s}")
    if len(set(header.seeds)) != len(header.seeds):
        raise _err(file, "ablation.seeds", f"duplicate seeds in {header.seeds}")

    # [[variant]]
    raw_variants = data.get("variant")
    if raw_variants is None:
        raise _err(file, "variant", "no [[variant]] tables: an ablation needs at least one variant")
    if not isinstance(raw_variants, list) or not all(isinstance(v, dict) for v in raw_variants):
        raise _err(file, "variant", "expected [[variant]] tables (an array of tables)")
    variants: list[Variant] = []
    seen: dict[str, int] = {}
    for i, rv in enumerate(raw_variants):
        where = f"variant[{i}]"
        if "name" not in rv:
            raise _err(file, f"{where}.name", "missing: every [[variant]] needs a name")
        vname = check_name(rv["name"], file=file, key=f"{where}.name", what="variant name")
        folded = vname.casefold()
        if folded in seen:
            raise _err(file, f"{where}.name", f"duplicate variant name {vname!r} (also variant[{seen[folded]}]; "
                                              "names are compared ignoring case)")
        seen[folded] = i
        factors = rv.get("factors", {})
        if not isinstance(factors, dict):
            raise _err(file, f"{where}.factors", f"expected a table of labels, got {factors!r}")
        for fk, fv in factors.items():
            if not isinstance(fv, (str, int, float, bool)):
                raise _err(file, f"{where}.factors.{fk}", f"a factor is a string, number or boolean, got {fv!r}")
        desc = rv.get("description", "")
        if not isinstance(desc, str):
            raise _err(file, f"{where}.description", f"expected a string, got {desc!r}")
        overrides = flatten({k: v for k, v in rv.items() if k not in VARIANT_RESERVED})
        _check_override_keys(overrides, file=file, where=f"variant {vname!r}")
        vprofiles = rv.get("profile", {})
        if not isinstance(vprofiles, dict) or not all(isinstance(t, dict) for t in vprofiles.values()):
            raise _err(file, f"{where}.profile", "expected [variant.profile.NAME] tables of dotted overrides")
        vprof_items = {}
        for pname, ptable in vprofiles.items():
            items = flatten(ptable)
            _check_override_keys(items, file=file, where=f"variant {vname!r} profile.{pname}")
            vprof_items[pname] = items
        vpaper = rv.get("paper")
        if vpaper is not None:
            vpaper = _parse_variant_paper(vpaper, file=file, key=f"{where}.paper")
        variants.append(Variant(vname, overrides, dict(factors), desc, vprof_items, vpaper))

    # [ablation] references to variants
    names = [v.name for v in variants]
    baseline = header.baseline or names[0]
    if baseline not in names:
        hint = closest(baseline, names)
        raise _err(file, "ablation.baseline", f"no variant named {baseline!r}; variants: {', '.join(names)}"
                   + (f" (did you mean {hint!r}?)" if hint else ""))
    paper_table, paper_rows = _parse_paper(header.paper, names, file=file)

    # [grid]
    raw_grid = data.get("grid", {})
    if not isinstance(raw_grid, dict):
        raise _err(file, "grid", f"expected a table of key = [values], got {raw_grid!r}")
    grid = flatten(raw_grid)
    _check_override_keys(grid, file=file, where="grid")
    for key, values in grid:
        if not isinstance(values, list) or not values:
            raise _err(file, f"grid.{key}", f"expected a non-empty list of values, got {values!r}")
        if len({repr(v) for v in values}) != len(values):
            raise _err(file, f"grid.{key}", f"duplicate values in {values!r}")

    # [profile.NAME]
    raw_profiles = data.get("profile", {})
    if not isinstance(raw_profiles, dict):
        raise _err(file, "profile", f"expected [profile.NAME] tables, got {raw_profiles!r}")
    profiles: dict[str, list[tuple[str, Any]]] = {}
    profile_slurm: dict[str, dict[str, Any]] = {}
    for pname, ptable in raw_profiles.items():
        check_name(pname, file=file, key=f"profile.{pname}", what="profile name")
        if not isinstance(ptable, dict):
            raise _err(file, f"profile.{pname}", f"expected a table of dotted overrides, got {ptable!r}")
        items = flatten(ptable)
        _check_override_keys(items, file=file, where=f"profile.{pname}")
        profile_slurm[pname] = {k[len("slurm."):]: v for k, v in items if k.startswith("slurm.")}
        profiles[pname] = [(k, v) for k, v in items if not k.startswith("slurm.")]

    for i, v in enumerate(variants):
        for pname in v.profiles:
            if pname not in profiles:
                hint = closest(pname, profiles)
                raise _err(file, f"variant[{i}].profile.{pname}", f"no [profile.{pname}] in this file; profiles: "
                           f"{', '.join(profiles) or '(none)'}" + (f" (did you mean {hint!r}?)" if hint else ""))

    # [slurm]
    raw_slurm = data.get("slurm", {})
    slurm = from_dict(SlurmSettings, raw_slurm, file=file, prefix="slurm")

    base, base_file = _load_base(data.get("base"), file=file, ablation_path=path)
    abl = Ablation(file=path, name=name, title=header.title, description=header.description,
                   seeds=list(header.seeds), baseline=baseline, paper_table=paper_table, paper_rows=paper_rows,
                   base=base, base_file=base_file, variants=variants, grid=grid, profiles=profiles, slurm=slurm,
                   profile_slurm=profile_slurm)
    if check:
        for pname in (profiles or {DEFAULT_PROFILE: []}):
            _validate_profile(abl, pname)
            if profile_slurm.get(pname):
                slurm_settings(abl, pname, {}, file=file)
    return abl


def _parse_variant_paper(paper: Any, *, file: str, key: str) -> dict[str, Any]:
    """A variant's own paper reference: { table = "...", row = N } or { table = "...", model = "...", epochs = N }."""
    if not isinstance(paper, dict):
        raise _err(file, key, f"expected a table {{ table, row }} or {{ table, model, epochs }}, got {paper!r}")
    allowed = ("table", "row", "model", "epochs")
    for k in paper:
        if k not in allowed:
            hint = closest(k, allowed)
            raise _err(file, f"{key}.{k}", f"unknown key; allowed: {', '.join(allowed)}"
                       + (f" (did you mean {hint!r}?)" if hint else ""))
    if not isinstance(paper.get("table"), str) or not paper["table"]:
        raise _err(file, f"{key}.table", f"expected the paper table's name (a string), got {paper.get('table')!r}")
    if ("row" in paper) == ("model" in paper):
        raise _err(file, key, "give either row (a row number) or model (a model name)")
    row = paper.get("row")
    if row is not None and (isinstance(row, bool) or not isinstance(row, int) or row < 1):
        raise _err(file, f"{key}.row", f"expected a row number >= 1, got {row!r}")
    for k, tp in (("model", str), ("epochs", int)):
        if k in paper and (not isinstance(paper[k], tp) or isinstance(paper[k], bool)):
            raise _err(file, f"{key}.{k}", f"expected {'a string' if tp is str else 'an integer'}, got {paper[k]!r}")
    return dict(paper)


def _parse_paper(paper: dict, names: list[str], *, file: str) -> tuple[str | None, dict[str, int]]:
    if not paper:
        return None, {}
    for k in paper:
        if k not in ("table", "rows"):
            hint = closest(k, ("table", "rows"))
            raise _err(file, f"ablation.paper.{k}", "unknown key; allowed: table, rows"
                       + (f" (did you mean {hint!r}?)" if hint else ""))
    table = paper.get("table")
    if not isinstance(table, str) or not table:
        raise _err(file, "ablation.paper.table", f"expected the paper table's name (a string), got {table!r}")
    rows = paper.get("rows", {})
    if not isinstance(rows, dict):
        raise _err(file, "ablation.paper.rows", f"expected a table variant = row number, got {rows!r}")
    out = {}
    for vname, row in rows.items():
        if vname not in names:
            hint = closest(vname, names)
            raise _err(file, f"ablation.paper.rows.{vname}", f"no variant named {vname!r}; variants: "
                       f"{', '.join(names)}" + (f" (did you mean {hint!r}?)" if hint else ""))
        if isinstance(row, bool) or not isinstance(row, int) or row < 1:
            raise _err(file, f"ablation.paper.rows.{vname}", f"expected a row number >= 1, got {row!r}")
        out[vname] = row
    return table, out


# --------------------------------------------------------------------------------------------- expansion

def _resolve(abl: Ablation, layers: list[tuple[str, list[tuple[str, Any]]]], *, file: str | None = None) -> RunSpec:
    """load_run_spec(base + each layer's overrides); an error names the layer that introduced it."""
    data = copy.deepcopy(abl.base)
    try:
        spec = load_run_spec(data, file=abl.base_file)
    except SpecError as err:
        prefix = "base" if abl.base_file == str(abl.file) else None
        raise SpecError(err.message, file=err.file or abl.base_file,
                        key=_join(prefix, err.key)) from None
    applied: list[tuple[str, Any]] = []
    for label, items in layers:
        applied = applied + items
        if not items:
            continue
        try:
            spec = load_run_spec(data, applied, file=file or str(abl.file))
        except SpecError as err:
            raise SpecError(err.message, file=file or str(abl.file), key=_join(label, err.key)) from None
    return spec


def _join(label: str | None, key: str | None) -> str | None:
    if label and key:
        return f"{label}: {key}"
    return label or key


def _grid_points(abl: Ablation) -> list[dict[str, Any]]:
    if not abl.grid:
        return [{}]
    keys = [k for k, _ in abl.grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(vals for _, vals in abl.grid))]


def _profile_items(abl: Ablation, profile: str) -> list[tuple[str, Any]]:
    if profile in abl.profiles:
        return abl.profiles[profile]
    if profile == DEFAULT_PROFILE and not abl.profiles:
        return []
    known = sorted(abl.profiles) or [DEFAULT_PROFILE]
    hint = closest(profile, known)
    raise SpecError(f"unknown profile {profile!r}; this file defines: {', '.join(known)}"
                    + (f" (did you mean {hint!r}?)" if hint else ""), file=str(abl.file), key="profile")


def _validate_profile(abl: Ablation, profile: str) -> None:
    prof = [(f"profile.{profile}", _profile_items(abl, profile))]
    _resolve(abl, prof)
    for v in abl.variants:
        _resolve(abl, prof + _variant_layers(v, profile))
    for point in _grid_points(abl):
        _resolve(abl, prof + [("grid", list(point.items()))])


def _variant_layers(v: Variant, profile: str) -> list[tuple[str, list[tuple[str, Any]]]]:
    return [(f"variant {v.name!r}", v.overrides),
            (f"variant {v.name!r} profile.{profile}", v.profiles.get(profile, []))]


def split_overrides(overrides: list[tuple[str, Any]] | None) -> tuple[list[tuple[str, Any]], dict[str, Any],
                                                                       list[int] | None]:
    """--set items -> (run-spec overrides, slurm settings, seeds): keys `slurm.X` set [slurm] X and
    `ablation.seeds` replaces the seeds; every other key overrides the run spec."""
    run, slurm, seeds = [], {}, None
    for key, value in overrides or []:
        if key.startswith("slurm."):
            slurm[key[len("slurm."):]] = value
        elif key == "ablation.seeds":
            if isinstance(value, int) and not isinstance(value, bool):
                value = [value]
            seeds = value
        elif key.startswith("ablation."):
            raise SpecError("only ablation.seeds can be set from the command line", file="--set", key=key)
        else:
            if key == "train.seed":
                raise SpecError("train.seed is set per run from the seeds; use --set ablation.seeds=[0,1]",
                                file="--set", key=key)
            run.append((key, value))
    return run, slurm, seeds


def slurm_settings(abl: Ablation, profile: str = DEFAULT_PROFILE, updates: dict[str, Any] | None = None, *,
                   file: str = "--set") -> SlurmSettings:
    """[slurm] <- the profile's "slurm.KEY" entries <- --set slurm.KEY=V, validated."""
    data = to_dict(abl.slurm)
    prof = abl.profile_slurm.get(profile, {})
    try:
        from_dict(SlurmSettings, {**data, **prof}, file=str(abl.file), prefix=f"profile.{profile}.slurm")
    except SpecError as err:
        raise SpecError(err.message, file=str(abl.file), key=err.key) from None
    data.update(prof)
    data.update(updates or {})
    return from_dict(SlurmSettings, data, file=file, prefix="slurm")


def expand(abl: Ablation, profile: str = DEFAULT_PROFILE, overrides: list[tuple[str, Any]] | None = None, *,
           results: str | Path = "results", seeds: list[int] | None = None) -> list[PlannedRun]:
    """variants x grid points x seeds -> planned runs, every spec resolved and validated.

    Order: base <- [profile.P] <- variant <- [variant.profile.P] <- grid point <- overrides (--set)
    <- train.seed = seed.
    """
    file = str(abl.file)
    if seeds is not None:
        if not isinstance(seeds, list) or not seeds or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise SpecError(f"expected a non-empty list of integers >= 0, got {seeds!r}", file="--set",
                            key="ablation.seeds")
        if len(set(seeds)) != len(seeds):
            raise SpecError(f"duplicate seeds in {seeds}", file="--set", key="ablation.seeds")
    seeds = list(seeds if seeds is not None else abl.seeds)
    overrides = list(overrides or [])
    for k, _ in overrides:
        if k == "train.seed":
            raise SpecError("train.seed is set per run from the seeds; use --set ablation.seeds=[0,1]",
                            file="--set", key=k)
    prof_items = _profile_items(abl, profile)
    results_root = Path(results).resolve()
    ablation_dir = results_root / abl.name
    _check_inside(ablation_dir, results_root, file, "ablation.name")
    runs: list[PlannedRun] = []
    for index, v in enumerate(abl.variants):
        for point in _grid_points(abl):
            layers = [(f"profile.{profile}", prof_items), *_variant_layers(v, profile),
                      ("grid", list(point.items()))]
            if overrides:
                _resolve(abl, layers + [("--set", overrides)], file=file)
            for seed in seeds:
                spec = _resolve(abl, layers + [("--set", overrides), ("seed", [("train.seed", seed)])])
                h = spec_hash(spec)
                run_dir = ablation_dir / f"{v.name}-s{seed}-{h}"
                _check_inside(run_dir, ablation_dir, file, f"variant {v.name!r}")
                factors = {**v.factors}
                paper = v.paper or ({"table": abl.paper_table, "row": abl.paper_rows[v.name]}
                                    if abl.paper_table and v.name in abl.paper_rows else None)
                runs.append(PlannedRun(ablation=abl.name, variant=v.name, seed=seed, grid=dict(point),
                                       factors=factors, paper=paper, profile=profile, spec=spec, spec_hash=h,
                                       run_dir=run_dir, title=abl.title, baseline=abl.baseline,
                                       ablation_file=str(abl.file.resolve()), variant_index=index))
    dirs = [r.run_dir for r in runs]
    if len(set(dirs)) != len(dirs):
        dup = next(d for d in dirs if dirs.count(d) > 1)
        raise SpecError(f"two runs resolve to the same folder {dup.name} (identical variants or grid points)",
                        file=file, key="variant")
    return runs


def _check_inside(path: Path, root: Path, file: str, key: str) -> None:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        raise SpecError(f"would write outside the results folder ({path})", file=file, key=key) from None
    if path.resolve() == root.resolve():
        raise SpecError(f"would write into the results folder itself ({path})", file=file, key=key)
