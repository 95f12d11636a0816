"""The ablation file format: declare a study once (torch-free; expanded into runs by dimr_lab.runner.plan).

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
    #   (epochs_at = { 500000 = 400 } shows the 400-epoch row beside the evaluation at step 500000)
    "model.norm" = "adaln_zero"            # everything else: dotted overrides of the base
    [variant.profile.tiny]                 # optional: this variant's overrides under one profile
    "model.preset" = "dimr_tiny_3r"

    [grid]                                 # optional: the cartesian product of these values
    "train.lr" = [1e-3, 3e-4]

    [profile.tiny]                         # named sets of dotted overrides; --profile picks one
    "train.steps" = 300                    # ("slurm.KEY" entries set [slurm] KEY under this profile)
    [profile.paper]
    include = "recipes/imagenet64.toml"    # a run-spec file (or a list) applied first: one recipe, many files
    [profile.small]
    extends = "tiny"                       # tiny's overrides (and every [variant.profile.tiny]) first
    seeds = [0, 1, 2, 3, 4, 5]             # this profile's own seeds

    [slurm]                                # launcher settings for --executor slurm (dimr_lab.spec.slurm)
    partition = "gpu"

The header, the variants' own keys and the paper references are dataclasses validated by the same schema
machinery as run specs (one "did you mean" for every unknown key); everything else in a variant is a
dotted override, checked against the run spec when the file is expanded. Specs are data: TOML only.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import itertools
import re
from dataclasses import dataclass, field as dc_field
from importlib import resources
from pathlib import Path
from typing import Any

from dimr_lab.errors import SpecError, UserError, closest, unknown_name_message
from dimr_lab.spec.run_spec import MAX_SEED, RunSpec
from dimr_lab.spec.schema import field, from_dict, load_toml, set_dotted

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
MAX_NAME = 80
BUILTIN_BASE = "default"
DEFAULT_PROFILE = "tiny"


# --------------------------------------------------------------------------------------------- rules

def check_name(value: Any, *, file: str | None, key: str, what: str) -> str:
    """A name that becomes a folder: ^[A-Za-z0-9][A-Za-z0-9_.-]*$, at most MAX_NAME characters."""
    if not isinstance(value, str):
        raise SpecError(f"expected a string, got {value!r}", file=file, key=key)
    if not value:
        raise SpecError(f"{what} must not be empty", file=file, key=key)
    if len(value) > MAX_NAME or not NAME_RE.match(value):
        raise SpecError(f"{what} {value!r} is not allowed: use letters, digits, '_', '.', '-' (starting with a "
                        f"letter or digit, at most {MAX_NAME} characters)", file=file, key=key)
    return value


def check_seeds(seeds: Any, *, file: str | None, key: str) -> list[int]:
    """The one seed rule: a non-empty list of distinct integers in 0..2**32-1."""
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds:
        raise SpecError(f"expected a non-empty list of integers, got {seeds!r}", file=file, key=key)
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
            raise SpecError(f"seeds are integers in 0..{MAX_SEED}, got {s!r}", file=file, key=f"{key}[{i}]")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"duplicate seeds in {seeds}", file=file, key=key)
    return list(seeds)


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


def check_override_keys(items: list[tuple[str, Any]], *, file: str | None, where: str) -> None:
    for k, _ in items:
        parts = k.split(".")
        key = f"{where}.{k}" if where else k
        if not all(parts) or not all(p.strip() == p for p in parts):
            raise SpecError(f"malformed dotted key {k!r}", file=file, key=key)
        if k == "train.seed":
            raise SpecError("train.seed is set from [ablation].seeds; list the seeds there", file=file, key=key)


# ------------------------------------------------------------------------------------ published tables

def paper_tables() -> list[str]:
    """Names of the published tables shipped in dimr_lab/paper/."""
    folder = resources.files("dimr_lab") / "paper"
    return sorted(p.name[: -len(".csv")] for p in folder.iterdir() if p.name.endswith(".csv"))


def paper_rows(table: str) -> list[dict[str, str]]:
    with (resources.files("dimr_lab") / "paper" / f"{table}.csv").open("r", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@dataclass
class PaperRef:
    """A published row: { table, row } or { table, model[, epochs] }."""

    table: str = field(help="a table in dimr_lab/paper/")
    row: int = field(0, min=0)
    model: str = field("")
    epochs: int = field(0, min=0)
    epochs_at: dict = field(default_factory=dict,
                            help="published rows at earlier training steps: { STEP = EPOCHS }, e.g. { 500000 = 400 }")

    def validate(self) -> None:
        tables = paper_tables()
        if self.table not in tables:
            raise SpecError(unknown_name_message("paper table", self.table, tables), key="table")
        if bool(self.row) == bool(self.model):
            raise SpecError("give either row (a row number) or model (a model name)", key="row")
        rows = paper_rows(self.table)
        if self.row:
            if not any(r.get("row") == str(self.row) for r in rows):
                raise SpecError(f"{self.table} has no row {self.row}", key="row")
        else:
            names = [r.get("model", "") for r in rows]
            hit = [r for r in rows if r.get("model") in (self.model, f"{self.model} ({self.epochs} epochs)")]
            if self.epochs and hit and "epochs" in rows[0]:
                hit = [r for r in hit if r.get("epochs") == str(self.epochs)]
            if not hit:
                hint = closest(self.model, names)
                raise SpecError(f"{self.table} has no model {self.model!r}"
                                + (f" with {self.epochs} epochs" if self.epochs else "")
                                + (f" (did you mean {hint!r}?)" if hint else ""), key="model")
        if self.epochs_at and not (self.model and self.epochs):
            raise SpecError("epochs_at needs a model and its final epochs", key="epochs_at")
        for step, epochs in self.epochs_at.items():
            key = f"epochs_at.{step}"
            if not (step.isdigit() and int(step) > 0):
                raise SpecError(f"{step!r} is not a training step (a positive integer)", key=key)
            if isinstance(epochs, bool) or not isinstance(epochs, int):
                raise SpecError(f"expected an integer (epochs), got {epochs!r}", key=key)
            if not any(r.get("model") in (self.model, f"{self.model} ({epochs} epochs)")
                       and r.get("epochs", str(epochs)) == str(epochs) for r in rows):
                raise SpecError(f"{self.table} has no model {self.model!r} with {epochs} epochs", key=key)

    def ref(self) -> dict[str, Any]:
        """The reference as run.json keeps it."""
        out: dict[str, Any] = {"table": self.table}
        if self.row:
            out["row"] = self.row
        else:
            out["model"] = self.model
            if self.epochs:
                out["epochs"] = self.epochs
            if self.epochs_at:
                out["epochs_at"] = {str(int(k)): v for k, v in sorted(self.epochs_at.items(), key=lambda kv: int(kv[0]))}
        return out


@dataclass
class PaperRows:
    """[ablation].paper: one table, a row number per variant."""

    table: str = field()
    rows: dict = field(default_factory=dict, help="variant = row number")


# ---------------------------------------------------------------------------------------------- tables

@dataclass
class Header:
    """[ablation]."""

    name: str = field(help="the ablation's folder under the results directory")
    title: str = field("")
    description: str = field("")
    seeds: list[int] = field(default_factory=lambda: [0])
    baseline: str = field("", help="variant the table's deltas are taken against ('' = the first)")
    paper: PaperRows | None = field(None)


@dataclass
class VariantKeys:
    """The keys of a [[variant]] that are not run-spec overrides."""

    name: str = field()
    factors: dict = field(default_factory=dict, help="labels for the table: strings, numbers, booleans")
    description: str = field("")
    paper: PaperRef | None = field(None)
    profile: dict = field(default_factory=dict, help="[variant.profile.NAME] tables of dotted overrides")


TOP_KEYS = ("ablation", "base", "variant", "grid", "profile", "slurm")
VARIANT_KEYS = tuple(f for f in VariantKeys.__dataclass_fields__)


@dataclass
class Variant:
    name: str
    overrides: list[tuple[str, Any]]
    factors: dict[str, Any]
    description: str = ""
    profiles: dict[str, list[tuple[str, Any]]] = dc_field(default_factory=dict)
    paper: dict[str, Any] | None = None


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
    slurm: dict[str, Any]                                 # raw [slurm] (validated by spec.slurm)
    profile_slurm: dict[str, dict[str, Any]] = dc_field(default_factory=dict)   # "slurm.X" keys of profiles
    profile_parent: dict[str, str] = dc_field(default_factory=dict)             # profile -> the one it extends
    profile_seeds: dict[str, list[int]] = dc_field(default_factory=dict)        # profile -> its own seeds

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def profile_names(self) -> list[str]:
        return sorted(self.profiles) or [DEFAULT_PROFILE]

    def profile_chain(self, profile: str) -> list[str]:
        """The profile and the ones it extends, the root first."""
        self.profile_items(profile)
        chain = [profile]
        while chain[-1] in self.profile_parent:
            chain.append(self.profile_parent[chain[-1]])
        return chain[::-1]

    def seeds_for(self, profile: str) -> list[int]:
        """The profile's own seeds (or those of the profile it extends), else [ablation].seeds."""
        for p in reversed(self.profile_chain(profile)):
            if p in self.profile_seeds:
                return list(self.profile_seeds[p])
        return list(self.seeds)

    def profile_items(self, profile: str) -> list[tuple[str, Any]]:
        if profile in self.profiles:
            return self.profiles[profile]
        if profile == DEFAULT_PROFILE and not self.profiles:
            return []
        known = self.profile_names()
        hint = closest(profile, known)
        defined = f"this file defines: {', '.join(known)}" if self.profiles else \
            (f"this file defines no profile: add [profile.{profile}], or run the default {DEFAULT_PROFILE!r} "
             f"(the [base] and variants as they are)")
        raise SpecError(f"unknown profile {profile!r}; {defined}" + (f" (did you mean {hint!r}?)" if hint else ""),
                        file=str(self.file), key="profile")


# --------------------------------------------------------------------------------------------- loading

def _table(data: Any, *, file: str, key: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(f"expected a table, got {data!r}", file=file, key=key)
    return data


def _load_base(raw: Any, *, file: str, ablation_path: Path) -> tuple[dict[str, Any], str]:
    from dimr_lab.spec.defaults import DEFAULT_RUN

    raw = copy.deepcopy(_table(raw, file=file, key="base"))
    ref = raw.pop("spec", None)
    if ref is None:
        data: dict[str, Any] = {}
        base_file = file
    elif not isinstance(ref, str) or not ref:
        raise SpecError(f"expected a path to a run spec (.toml) or {BUILTIN_BASE!r}, got {ref!r}", file=file,
                        key="base.spec")
    elif ref == BUILTIN_BASE:
        data, base_file = copy.deepcopy(DEFAULT_RUN), file
    else:
        path = Path(ref) if Path(ref).is_absolute() else ablation_path.parent / ref
        try:
            data = load_toml(path)
        except UserError as err:
            raise SpecError(str(err), file=file, key="base.spec") from None
        base_file = str(path)
    items = flatten(raw)
    check_override_keys(items, file=file, where="base")
    for key, value in items:
        set_dotted(data, key, value, file=file)
    return data, base_file


def _included(ref: Any, *, file: str, key: str, ablation_path: Path) -> list[tuple[str, Any]]:
    """A profile's `include = "recipe.toml"` (or a list of them): run-spec TOML files, relative to the
    ablation file, read as dotted overrides applied before the profile's own keys. One recipe shared by
    several ablation files is written once."""
    if ref is None:
        return []
    refs = ref if isinstance(ref, list) else [ref]
    items: list[tuple[str, Any]] = []
    for i, r in enumerate(refs):
        where = f"{key}[{i}]" if isinstance(ref, list) else key
        if not isinstance(r, str) or not r:
            raise SpecError(f"expected a path to a recipe (.toml), got {r!r}", file=file, key=where)
        path = Path(r) if Path(r).is_absolute() else ablation_path.parent / r
        try:
            items += flatten(load_toml(path))
        except UserError as err:
            raise SpecError(str(err), file=file, key=where) from None
    return items


def _variants(raw: Any, *, file: str, ablation_path: Path) -> list[Variant]:
    if raw is None:
        raise SpecError("no [[variant]] tables: an ablation needs at least one variant", file=file, key="variant")
    if not isinstance(raw, list) or not all(isinstance(v, dict) for v in raw):
        raise SpecError("expected [[variant]] tables (an array of tables)", file=file, key="variant")
    out: list[Variant] = []
    seen: dict[str, int] = {}
    for i, rv in enumerate(raw):
        where = f"variant[{i}]"
        own = {k: v for k, v in rv.items() if k in VARIANT_KEYS}
        if "name" not in own:
            raise SpecError("missing: every [[variant]] needs a name", file=file, key=f"{where}.name")
        keys = from_dict(VariantKeys, own, file=file, prefix=where)
        name = check_name(keys.name, file=file, key=f"{where}.name", what="variant name")
        if name.casefold() in seen:
            raise SpecError(f"duplicate variant name {name!r} (also variant[{seen[name.casefold()]}]; names are "
                            f"compared ignoring case)", file=file, key=f"{where}.name")
        seen[name.casefold()] = i
        for fk, fv in keys.factors.items():
            if not isinstance(fv, (str, int, float, bool)):
                raise SpecError(f"a factor is a string, number or boolean, got {fv!r}", file=file,
                                key=f"{where}.factors.{fk}")
        overrides = flatten({k: v for k, v in rv.items() if k not in VARIANT_KEYS})
        check_override_keys(overrides, file=file, where=f"variant {name!r}")
        profiles = {}
        for pname, ptable in keys.profile.items():
            ptable = dict(_table(ptable, file=file, key=f"{where}.profile.{pname}"))
            items = _included(ptable.pop("include", None), file=file, key=f"{where}.profile.{pname}.include",
                              ablation_path=ablation_path)
            # one job array runs every variant: a recipe's [slurm] applies through a profile, not a variant
            items = [(k, v) for k, v in items if not k.startswith("slurm.")] + flatten(ptable)
            check_override_keys(items, file=file, where=f"variant {name!r} profile.{pname}")
            profiles[pname] = items
        out.append(Variant(name, overrides, dict(keys.factors), keys.description, profiles,
                           keys.paper.ref() if keys.paper else None))
    return out


def load_ablation(path: str | Path, *, check: bool = True) -> Ablation:
    """Parse and validate an ablation file. With `check`, every profile x variant x grid point is resolved
    (dimr_lab.runner.plan), so unknown components and keys fail here, before anything runs."""
    path = Path(path)
    file = str(path)
    data = load_toml(path)
    if "ablation" not in data and set(data) & {f.name for f in dataclasses.fields(RunSpec)}:
        raise SpecError("a run spec, not an ablation file (no [ablation] table): train it with "
                        "`dimr-lab train FILE --out DIR`", file=file)
    for k in data:
        if k not in TOP_KEYS:
            hint = closest(k, TOP_KEYS)
            raise SpecError(f"unknown key; allowed: {', '.join(TOP_KEYS)}" + (f" (did you mean {hint!r}?)" if hint else ""),
                            file=file, key=k)
    if "ablation" not in data:
        raise SpecError("missing the [ablation] table (name, seeds, ...)", file=file, key="ablation")
    header = from_dict(Header, _table(data["ablation"], file=file, key="ablation"), file=file, prefix="ablation")
    name = check_name(header.name, file=file, key="ablation.name", what="ablation name")
    seeds = check_seeds(header.seeds, file=file, key="ablation.seeds")
    variants = _variants(data.get("variant"), file=file, ablation_path=path)
    names = [v.name for v in variants]
    baseline = header.baseline or names[0]
    if baseline not in names:
        hint = closest(baseline, names)
        raise SpecError(f"no variant named {baseline!r}; variants: {', '.join(names)}"
                        + (f" (did you mean {hint!r}?)" if hint else ""), file=file, key="ablation.baseline")
    paper_table, paper_rows_ = _paper_rows(header.paper, names, file=file)

    grid = flatten(_table(data.get("grid"), file=file, key="grid"))
    check_override_keys(grid, file=file, where="grid")
    for key, values in grid:
        if not isinstance(values, list) or not values:
            raise SpecError(f"expected a non-empty list of values, got {values!r}", file=file, key=f"grid.{key}")
        if len({repr(v) for v in values}) != len(values):
            raise SpecError(f"duplicate values in {values!r}", file=file, key=f"grid.{key}")

    profiles: dict[str, list[tuple[str, Any]]] = {}
    profile_slurm: dict[str, dict[str, Any]] = {}
    parents: dict[str, str] = {}
    own_seeds: dict[str, list[int]] = {}
    raw_profiles = _table(data.get("profile"), file=file, key="profile")
    for pname, ptable in raw_profiles.items():
        check_name(pname, file=file, key=f"profile.{pname}", what="profile name")
        ptable = dict(_table(ptable, file=file, key=f"profile.{pname}"))
        parent = ptable.pop("extends", None)
        if parent is not None:
            if not isinstance(parent, str) or parent not in raw_profiles or parent == pname:
                hint = closest(str(parent), [p for p in raw_profiles if p != pname])
                raise SpecError(f"extends {parent!r}: no such other profile in this file"
                                + (f" (did you mean {hint!r}?)" if hint else ""), file=file,
                                key=f"profile.{pname}.extends")
            parents[pname] = parent
        if "seeds" in ptable:
            own_seeds[pname] = check_seeds(ptable.pop("seeds"), file=file, key=f"profile.{pname}.seeds")
        items = _included(ptable.pop("include", None), file=file, key=f"profile.{pname}.include", ablation_path=path)
        items += flatten(ptable)
        check_override_keys(items, file=file, where=f"profile.{pname}")
        profile_slurm[pname] = {k[len("slurm."):]: v for k, v in items if k.startswith("slurm.")}
        profiles[pname] = [(k, v) for k, v in items if not k.startswith("slurm.")]
    for pname in parents:  # an extended profile's overrides come first; no cycles
        chain, p = [pname], pname
        while p in parents:
            p = parents[p]
            if p in chain:
                raise SpecError(f"profiles extend each other in a cycle: {' -> '.join(chain + [p])}", file=file,
                                key=f"profile.{pname}.extends")
            chain.append(p)
    for pname in profiles:
        chain, p = [], pname
        while p in parents:
            p = parents[p]
            chain.append(p)
        profile_slurm[pname] = {k: v for c in reversed(chain) for k, v in profile_slurm[c].items()} | \
            profile_slurm[pname]
    for i, v in enumerate(variants):
        for pname in v.profiles:
            if pname not in profiles:
                hint = closest(pname, profiles)
                raise SpecError(f"no [profile.{pname}] in this file; profiles: {', '.join(profiles) or '(none)'}"
                                + (f" (did you mean {hint!r}?)" if hint else ""), file=file,
                                key=f"variant[{i}].profile.{pname}")

    base, base_file = _load_base(data.get("base"), file=file, ablation_path=path)
    abl = Ablation(file=path, name=name, title=header.title, description=header.description, seeds=seeds,
                   baseline=baseline, paper_table=paper_table, paper_rows=paper_rows_, base=base, base_file=base_file,
                   variants=variants, grid=grid, profiles=profiles,
                   slurm=_table(data.get("slurm"), file=file, key="slurm"), profile_slurm=profile_slurm,
                   profile_parent=parents, profile_seeds=own_seeds)
    if check:
        from dimr_lab.spec.slurm import resolve_slurm

        resolve_slurm(abl, None, file=file)
        for pname in profile_slurm:
            if profile_slurm[pname]:
                resolve_slurm(abl, pname, file=file)
        validate_profiles(abl)
    return abl


def _paper_rows(paper: PaperRows | None, names: list[str], *, file: str) -> tuple[str | None, dict[str, int]]:
    if paper is None:
        return None, {}
    out = {}
    for vname, row in paper.rows.items():
        key = f"ablation.paper.rows.{vname}"
        if vname not in names:
            hint = closest(vname, names)
            raise SpecError(f"no variant named {vname!r}; variants: {', '.join(names)}"
                            + (f" (did you mean {hint!r}?)" if hint else ""), file=file, key=key)
        try:
            from_dict(PaperRef, {"table": paper.table, "row": row}, file=file, prefix=key)
        except SpecError as err:
            raise SpecError(err.message, file=file, key=key) from None
        out[vname] = row
    if not out:  # a table without rows still names a table that must exist
        if paper.table not in paper_tables():
            raise SpecError(unknown_name_message("paper table", paper.table, paper_tables()), file=file,
                            key="ablation.paper.table")
    return paper.table, out


# ---------------------------------------------------------------------------------------- resolution

Layer = tuple[str, list[tuple[str, Any]]]


def grid_points(abl: Ablation, extra: list[tuple[str, list[Any]]] | None = None) -> list[dict[str, Any]]:
    """Every point of [grid] x the extra grid (from the command line); one empty point without a grid."""
    grid = list(abl.grid) + [(k, v) for k, v in (extra or []) if k not in dict(abl.grid)]
    grid = [(k, dict(extra or []).get(k, v)) for k, v in grid]
    if not grid:
        return [{}]
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(vals for _, vals in grid))]


def variant_layers(abl: Ablation, v: Variant, profile: str, point: dict[str, Any] | None = None) -> list[Layer]:
    """base <- [profile.P] (the profiles it extends first) <- variant <- [variant.profile.P] (likewise)
    <- grid point, as labelled layers."""
    chain = abl.profile_chain(profile)
    return [*((f"profile.{p}", abl.profile_items(p)) for p in chain), (f"variant {v.name!r}", v.overrides),
            *((f"variant {v.name!r} profile.{p}", v.profiles.get(p, [])) for p in chain),
            ("grid", list((point or {}).items()))]


def resolve(abl: Ablation, layers: list[Layer], *, prefix_resolved: bool = False) -> Any:
    """The RunSpec of base + each layer's overrides; an error names the layer that introduced it.
    prefix_resolved: the same layers but the last resolved before (the seeds of one variant): the whole stack
    is loaded at once, and only an error walks the layers again to name the one that brought it in."""
    from dimr_lab.spec.run_spec import load_run_spec

    if prefix_resolved:
        try:
            return load_run_spec(copy.deepcopy(abl.base), [item for _, items in layers for item in items],
                                 overrides_source=str(abl.file))
        except SpecError:
            pass  # said below, by the layer that brings it in
    data = copy.deepcopy(abl.base)
    try:
        spec = load_run_spec(data, file=abl.base_file)
    except SpecError as err:
        prefix = "base" if abl.base_file == str(abl.file) else None
        raise SpecError(err.message, file=err.file or abl.base_file, key=_join(prefix, err.key)) from None
    applied: list[tuple[str, Any]] = []
    for label, items in layers:
        if not items:
            continue
        applied = applied + items
        file = "--set" if label == "--set" else str(abl.file)
        try:
            spec = load_run_spec(data, applied, overrides_source=file)
        except SpecError as err:
            raise SpecError(err.message, file=file, key=err.key if label == "--set" else _join(label, err.key)) from None
    return spec


def _join(label: str | None, key: str | None) -> str | None:
    if label and key:
        return f"{label}: {key}"
    return label or key


def validate_profiles(abl: Ablation) -> None:
    """Resolve every profile x variant x grid point (the base alone first, so its errors name it)."""
    for profile in abl.profile_names():
        chain = [(f"profile.{p}", abl.profile_items(p)) for p in abl.profile_chain(profile)]
        resolve(abl, chain)
        for v in abl.variants:
            resolve(abl, variant_layers(abl, v, profile))
        for point in grid_points(abl):
            resolve(abl, chain + [("grid", list(point.items()))])
