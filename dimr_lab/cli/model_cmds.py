"""Commands about networks and specs: `components`, `keys`, `describe`."""

from __future__ import annotations

import json
from typing import Optional

import typer

from dimr_lab.cli import app


@app.command()
def components(kind: Optional[str] = typer.Argument(None, help="a kind (norm, block, dataset, sampler, ...); "
                                                                "none = every kind")) -> None:
    """List the registered components (by kind) with a one-line summary and the spec keys each reads."""
    from rich.console import Console
    from rich.table import Table

    from dimr_lab.errors import UserError, unknown_name_message
    from dimr_lab.registry import KINDS
    from dimr_lab.spec.keys import choosing_keys

    if kind is not None and kind not in KINDS:
        raise UserError(unknown_name_message("component kind", kind, KINDS))
    table = Table(title="dimr-lab components")
    for col in ("kind", "name", "summary", "reads"):
        table.add_column(col, overflow="fold")
    registries = [KINDS[kind]] if kind else list(KINDS.values())
    for registry in registries:
        for entry in registry.entries():
            table.add_row(registry.kind, entry.name, entry.summary, ", ".join(entry.keys))
    console = Console()
    console.print(table)
    console.print("chosen in a run spec by (`dimr-lab keys` lists every key):")
    for registry in registries:
        console.print(f"  {registry.kind}: {', '.join(choosing_keys(registry.kind)) or '(no spec key)'}",
                      highlight=False)


@app.command()
def keys(section: Optional[str] = typer.Argument(None, help="a section (model, data, diffusion, train, sample, "
                                                              "eval, track); none = every section"),
         as_json: bool = typer.Option(False, "--json", help="one JSON object per key")) -> None:
    """Every key a run spec takes (`section.key`, as in `--set` and ablation files): type, default, what is
    allowed and what it does. model.* defaults are the bare model spec's; a preset sets its own."""
    from dimr_lab.errors import UserError, unknown_name_message
    from dimr_lab.spec.keys import SECTIONS, spec_keys

    if section is not None and section not in SECTIONS:
        raise UserError(unknown_name_message("spec section", section, SECTIONS))
    rows = spec_keys(section)
    if as_json:
        for k in rows:
            print(json.dumps({"key": k.key, "type": k.type, "default": k.default, "allowed": k.allowed,
                              "help": k.help}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="run spec keys" + (f" of {section}" if section else ""),
                  caption="default: what a spec that leaves the key out gets; the built-in default run "
                          "(`spec = \"default\"`, dimr_lab/spec/defaults.py) and presets set some of their own")
    for col in ("key", "type", "default", "allowed", "help"):
        table.add_column(col, overflow="fold")
    for k in rows:
        table.add_row(k.key, k.type, "" if k.default is None else json.dumps(k.default), k.allowed, k.help)
    Console().print(table)


def _ablation_model(path: str, variant: str | None, profile: str | None, overrides: list[str] | None):
    """The network one variant of an ablation file builds under a profile (the file's default profile, as
    `run`, when none is given); --set model keys apply on top, derived widths derived again."""
    from dimr_lab.errors import UserError
    from dimr_lab.runner.plan import expand
    from dimr_lab.spec.ablation import DEFAULT_PROFILE, load_ablation
    from dimr_lab.spec.model_spec import resolve_model
    from dimr_lab.spec.schema import parse_overrides, to_dict

    abl = load_ablation(path, check=False)
    names = [v.name for v in abl.variants]
    if variant is None:
        raise UserError(f"{path}: an ablation file: give --variant NAME (one of {', '.join(names)}); "
                        f"`dimr-lab run {path} --dry-run` lists every network and its size")
    if variant not in names:
        from dimr_lab.errors import unknown_name_message

        raise UserError(f"{path}: --variant: " + unknown_name_message("variant", variant, names))
    runs = expand(abl, profile or DEFAULT_PROFILE, only=[variant])
    models = {json.dumps(to_dict(r.spec.model), sort_keys=True): r.spec.model for r in runs}
    if len(models) != 1:
        raise UserError(f"{path}: variant {variant!r} builds {len(models)} networks across its grid points under "
                        f"profile {profile or DEFAULT_PROFILE}; `dimr-lab run {path} --only {variant} --dry-run` "
                        f"lists them")
    (spec,) = models.values()
    if not overrides:
        return spec
    return resolve_model(spec.unresolved(), file=path, key="model", overrides=parse_overrides(overrides))


def _is_ablation_file(model: str) -> bool:
    from pathlib import Path

    from dimr_lab.spec.schema import load_toml

    if not (model.endswith(".toml") and Path(model).is_file()):
        return False
    raw = load_toml(model)
    return "ablation" in raw or "variant" in raw


def _load_model_spec(model: str, overrides: list[str] | None, variant: str | None = None,
                     profile: str | None = None):
    """A preset name, a model TOML file, a run folder (the network its spec.json, else run.json, records), or
    an ablation file with a variant (and a profile)."""
    from pathlib import Path

    from dimr_lab.errors import UserError
    from dimr_lab.rundir import RunDir, is_run_folder
    from dimr_lab.spec.model_spec import resolve_model
    from dimr_lab.spec.schema import parse_overrides

    if _is_ablation_file(model):
        return _ablation_model(model, variant, profile, overrides)
    if variant is not None or profile is not None:
        raise UserError(f"{model}: --variant and --profile describe a variant of an ablation file "
                        f"(ablations/NAME.toml); this is not one")
    if Path(model).is_dir():
        if not is_run_folder(Path(model)):
            raise UserError(f"{model}: a folder without run.json or spec.json, not a run; describe takes a preset "
                            f"name, a model TOML file or a run folder")
        run = RunDir(model)
        data = run.spec_data().get("model")
        where = run.spec_path if run.spec_path.exists() else run.record_path
        spec = resolve_model(data if isinstance(data, dict) else {}, file=str(where), key="model")
        if not overrides:
            return spec
        # the folder records the resolved network: what resolve() derived (an MLP's width) is derived again
        # from the overridden settings, as `describe` of the spec the run was made from with them does
        return resolve_model(spec.unresolved(), file=str(where), key="model", overrides=parse_overrides(overrides))
    return resolve_model(model, overrides=parse_overrides(overrides))


@app.command()
def describe(
    model: str = typer.Argument(..., help="a preset name, a model TOML file, a run folder or an ablation file "
                                          "(with --variant)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a model key, e.g. branches.0.depth=5"),
    variant: Optional[str] = typer.Option(None, "--variant", help="an ablation file's variant to describe"),
    profile: Optional[str] = typer.Option(None, "--profile", help="the ablation file's profile (default: tiny, "
                                                                  "as `run`)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON (params, gmacs, branches, spec)"),
) -> None:
    """Parameters (TD tensors count 4x, as the paper) and GMACs (one forward, batch 1), per branch and total.
    Counts are remembered by the network's spec (shipped for presets and the ablation files), so a known
    network is described without building it."""
    from dimr_lab.spec.counts import lookup
    from dimr_lab.spec.presets import PAPER_SIZES
    from dimr_lab.spec.schema import to_dict

    spec = _load_model_spec(model, set_, variant, profile)
    info = lookup(spec)
    if info is None:  # not counted before: build it on the meta device, once
        from dimr_lab.nn.describe import counts_for

        info = counts_for(spec)
    info = dict(info)
    paper = PAPER_SIZES.get(model) if not set_ else None
    if as_json:
        info["spec"] = to_dict(spec)
        if paper:
            info["paper"] = {"params": paper[0], "gmacs": paper[1]}
        print(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{spec.name}: {spec.image_size}x{spec.image_size}x{spec.in_channels}, "
                        f"{len(spec.branches)} branch(es), norm {spec.norm}, {spec.conditioning} conditioning")
    for col in ("branch", "block", "width", "blocks", "tokens", "patch", "params", "GMACs"):
        table.add_column(col, justify="right")
    for row in info["branches"]:
        table.add_row(str(row["branch"]), row["block"], str(row["width"]), str(row["blocks"]), row["tokens"],
                      str(row["patch"]), f"{row['params'] / 1e6:.2f}M", _gmacs_text(row["gmacs"]))
    table.add_row("shared", "", "", "", "", "", f"{info['shared_params'] / 1e6:.2f}M", "")
    total_p = f"{info['params'] / 1e6:.2f}M" + (f" (paper {paper[0] / 1e6:.2f}M)" if paper else "")
    total_g = _gmacs_text(info["gmacs"]) + (f" (paper {paper[1]})" if paper and paper[1] else "")
    table.add_row("total", "", "", "", "", "", total_p, total_g, style="bold")
    console = Console()
    console.print(table)
    console.print(f"time-dependent parameters: {info['td_params'] / 1e6:.3f}M; outputs {info['output_sizes']}")


def _gmacs_text(g: float) -> str:
    """GMACs to three significant figures, so tiny networks do not read 0.0 (1.2e-5 -> '1.2e-05')."""
    return f"{g:.1f}" if g >= 100 else f"{g:.3g}"
