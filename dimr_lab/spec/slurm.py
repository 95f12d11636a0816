"""SLURM settings of `run --executor slurm`, as a cluster user writes them (torch-free).

Every sbatch option submitit knows is a field here (validated where a mistake is common: time in SLURM's
formats, GPUs and tasks that fit together); any other option passes through `additional` (`--key=value`
lines) or `sbatch_lines` (raw `--flag[=value]` strings); `srun_args` go to srun.

Order, each layer overriding the one before: the user's defaults (`[slurm]` of $DIMR_LAB_CONFIG, else
$XDG_CONFIG_HOME/dimr-lab/config.toml or ~/.config/dimr-lab/config.toml) <- the ablation file's [slurm]
<- the profile's "slurm.KEY" entries <- `--set slurm.KEY=V`. `resolve_slurm` says where each value came from.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dimr_lab.errors import SpecError
from dimr_lab.spec.schema import field, from_dict, load_toml, to_dict

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?\Z")


def parse_time(value: Any) -> int:
    """Minutes from a SLURM time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (or an integer of minutes)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError("at least one minute")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected minutes or a SLURM time string, got {value!r}")
    m = _TIME.match(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not a SLURM time (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S)")
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-H, D-H:M, D-H:M:S
        h, mi, s = (parts + [0, 0])[:3]
        minutes = int(days) * 1440 + h * 60 + mi + (1 if s else 0)
    elif len(parts) == 1:  # M
        minutes = parts[0]
    elif len(parts) == 2:  # M:S
        minutes = parts[0] + (1 if parts[1] else 0)
    else:  # H:M:S
        minutes = parts[0] * 60 + parts[1] + (1 if parts[2] else 0)
    if minutes < 1:
        raise ValueError("at least one minute")
    return minutes


def _owned(name: str) -> str:
    """Why an sbatch option dimr-lab sets itself cannot be passed through."""
    if name in ("requeue", "no-requeue"):
        return (f"--{name}: dimr-lab submits every job with --requeue (a timed-out or preempted task checkpoints and "
                f"requeues itself); slurm.max_requeues bounds the timeouts")
    return f"--{name} is checked or set by dimr-lab (slurm.* settings); set it there"


def _mem(value: str) -> str:
    if value and not re.fullmatch(r"\d+[KMGT]?B?", value, re.IGNORECASE):
        raise ValueError(f"{value!r} is not a SLURM memory size (e.g. 400G, 16000M)")
    return value


@dataclass
class SlurmSettings:
    """`[slurm]`: how `--executor slurm` submits the ablation's job array (flags: `--set slurm.KEY=V`)."""

    partition: str = field("", help="'' = the cluster's default partition")
    account: str = field("")
    qos: str = field("")
    time: str = field("", help="time limit of one array task in SLURM's formats (2-00:00:00, 90, 1:30:00)",
                      parser=lambda v, file, key: str(v) if isinstance(v, int) and not isinstance(v, bool) else v)
    time_min: int = field(60, min=1, help="time limit in minutes, when `time` is not given")
    nodes: int = field(1, min=1)
    gpus_per_node: int = field(0, min=0)
    gpus_per_task: int = field(0, min=0)
    tasks_per_node: int = field(0, min=0, help="processes per node; 0 = one per GPU of gpus_per_node (DDP), else 1")
    cpus_per_task: int = field(0, min=0, help="0 = the cluster's default")
    cpus_per_gpu: int = field(0, min=0)
    mem_gb: float = field(0.0, min=0.0, help="memory per node in GB (0 = the cluster's default); or `mem`")
    mem: str = field("", help="memory per node as sbatch writes it (400G)")
    mem_per_gpu: str = field("")
    mem_per_cpu: str = field("")
    gres: str = field("", help="e.g. gpu:a100:8 (instead of gpus_per_node)")
    constraint: str = field("")
    exclude: str = field("")
    nodelist: str = field("")
    reservation: str = field("")
    dependency: str = field("")
    exclusive: bool = field(False)
    comment: str = field("")
    mail_type: str = field("")
    mail_user: str = field("")
    wckey: str = field("submitit")
    array_parallelism: int = field(64, min=1, help="array tasks running at once")
    signal_delay_s: int = field(120, min=1, help="USR2 this long before the time limit: checkpoint, requeue")
    max_requeues: int = field(10, min=0, help="timeouts a run may requeue itself after")
    job_name: str = field("", help="'' = dimr-<ablation>")
    setup: list[str] = field(default_factory=list, help="shell lines run before the task (module load ...)")
    additional: dict = field(default_factory=dict, help="any other sbatch option: { hint = 'nomultithread' }")
    sbatch_lines: list[str] = field(default_factory=list, help="raw sbatch options: ['--hint=nomultithread']")
    srun_args: list[str] = field(default_factory=list, help="arguments of srun, e.g. ['--cpu-bind=none']")

    def validate(self) -> None:
        for i, line in enumerate(self.setup):
            if "\n" in line:
                raise SpecError("one shell line per entry (no newlines)", key=f"setup[{i}]")
        if self.time:
            try:
                parse_time(self.time)
            except ValueError as err:
                raise SpecError(str(err), key="time") from None
        for key in ("mem", "mem_per_gpu", "mem_per_cpu"):
            try:
                _mem(getattr(self, key))
            except ValueError as err:
                raise SpecError(str(err), key=key) from None
        if self.mem and self.mem_gb:
            raise SpecError("give mem or mem_gb, not both", key="mem")
        tasks = self.node_tasks()
        gpus = self.gpus_per_node or self.gpus_per_task * tasks
        if self.gpus_per_node and self.gpus_per_task:
            raise SpecError("give gpus_per_node or gpus_per_task, not both", key="gpus_per_task")
        if self.gpus_per_node and self.gpus_per_node != tasks:
            idle = self.gpus_per_node - tasks
            raise SpecError(f"{self.gpus_per_node} GPUs per node but {tasks} task(s) per node: one "
                            f"process drives one GPU, so " + (f"{idle} GPU(s) would idle" if idle > 0 else
                                                              f"{-idle} task(s) would have no GPU")
                            + f"; set slurm.tasks_per_node = {self.gpus_per_node}", key="tasks_per_node")
        if gpus and self.gres and "gpu" in self.gres:
            raise SpecError("GPUs are given twice (gres and gpus_per_node/gpus_per_task)", key="gres")
        gres_gpus = self.gres_gpus()
        if gres_gpus and gres_gpus != tasks:
            raise SpecError(f"gres gives {gres_gpus} GPUs per node but there are {tasks} task(s) per node: one "
                            f"process drives one GPU; set slurm.tasks_per_node = {gres_gpus} (or 0)",
                            key="tasks_per_node")
        if self.signal_delay_s >= 60 * self.minutes():
            raise SpecError(f"{self.signal_delay_s} s is not shorter than the time limit ({self.minutes()} min): "
                            f"every task would be told to checkpoint and requeue as it starts",
                            key="signal_delay_s")
        # what the checks above rely on, and what dimr-lab itself reads back (the log, the array, the signal)
        own = {"time", "time-min", "nodes", "ntasks-per-node", "ntasks", "gpus-per-node", "gpus-per-task", "gpus",
               "gres", "mem", "mem-per-gpu", "mem-per-cpu", "job-name", "output", "error", "array", "signal",
               "open-mode", "requeue", "no-requeue"}
        for i, line in enumerate(self.sbatch_lines):
            if not re.fullmatch(r"--[A-Za-z][A-Za-z0-9_-]*(=\S.*)?", line.strip()) or "\n" in line:
                raise SpecError(f"{line!r}: expected an sbatch option such as '--hint=nomultithread'",
                                key=f"sbatch_lines[{i}]")
            name = line.strip()[2:].split("=", 1)[0]
            if name in own:  # it would silently beat the validated setting (or the log dimr-lab reads)
                raise SpecError(f"{line!r}: {_owned(name)}", key=f"sbatch_lines[{i}]")
        for k, v in self.additional.items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", str(k)) or not isinstance(v, (str, int, float, bool)):
                raise SpecError(f"an sbatch option name and a string, number or true, got {k!r} = {v!r}",
                                key=f"additional.{k}")
            if str(k).replace("_", "-") in own:
                raise SpecError(_owned(str(k).replace("_", "-")), key=f"additional.{k}")
            if v is False:
                raise SpecError("false is no sbatch value: leave the option out (true writes the bare flag)",
                                key=f"additional.{k}")

    def minutes(self) -> int:
        return parse_time(self.time) if self.time else self.time_min

    def gres_gpus(self) -> int:
        """GPUs per node that `gres` asks for (gpu:8, gpu:a100:8; 0 without GPUs there)."""
        for part in self.gres.split(","):
            fields = part.strip().split(":")
            if fields[0] == "gpu":
                return int(fields[-1]) if len(fields) > 1 and fields[-1].isdigit() else 1
        return 0

    def node_tasks(self) -> int:
        """Processes per node: `tasks_per_node`, or one per GPU (gpus_per_node or gres) when it is 0."""
        return self.tasks_per_node or self.gpus_per_node or self.gres_gpus() or 1

    def tasks(self) -> int:
        return self.nodes * self.node_tasks()


# ---------------------------------------------------------------------------------------- user defaults

def config_path() -> Path:
    """$DIMR_LAB_CONFIG, else $XDG_CONFIG_HOME/dimr-lab/config.toml, else ~/.config/dimr-lab/config.toml."""
    if os.environ.get("DIMR_LAB_CONFIG"):
        return Path(os.environ["DIMR_LAB_CONFIG"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "dimr-lab" / "config.toml"


def user_slurm_defaults() -> tuple[dict[str, Any], str]:
    """([slurm] of the user's config file or {}, its path); a malformed file is one SpecError naming it."""
    path = config_path()
    if not path.exists() and not os.environ.get("DIMR_LAB_CONFIG"):
        return {}, str(path)
    data = load_toml(path)
    for k in data:
        if k != "slurm":
            raise SpecError("unknown section; allowed: slurm", file=str(path), key=k)
    slurm = data.get("slurm", {})
    if not isinstance(slurm, dict):
        raise SpecError(f"expected a table, got {slurm!r}", file=str(path), key="slurm")
    from_dict(SlurmSettings, slurm, file=str(path), prefix="slurm")
    return slurm, str(path)


def resolve_slurm(abl: Any, profile: str | None = "tiny", updates: dict[str, Any] | None = None, *,
                  file: str = "--set") -> tuple[SlurmSettings, dict[str, str]]:
    """(settings, where each value that is not a default came from); profile None: the file's [slurm] only.
    A value that does not validate is one SpecError naming the layer (file, key) that brought it."""
    user, user_file = user_slurm_defaults()
    afile = str(abl.file)
    layers = [(f"user config {user_file}", user_file, "slurm", user), (f"{afile} [slurm]", afile, "slurm", abl.slurm)]
    for p in (abl.profile_chain(profile) if profile is not None else []):
        layers.append((f"{afile} [profile.{p}]", afile, f"profile.{p}.slurm", abl.profile_slurm.get(p, {})))
    layers.append(("--set", file, "slurm", dict(updates or {})))
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for label, where, prefix, values in layers:
        if not values:
            continue
        for a, b in (("time", "time_min"), ("time_min", "time")):  # two spellings of one limit: the later layer's wins
            if a in values and b not in values:
                data.pop(b, None)
                sources.pop(b, None)  # and the replaced spelling no longer says where it came from
        data.update(values)
        from_dict(SlurmSettings, data, file=where, prefix=prefix)
        sources.update({k: label for k, v in values.items() if v not in ([], {}, "")})
    return from_dict(SlurmSettings, data, file=file, prefix="slurm"), sources


def slurm_settings(abl: Any, profile: str = "tiny", updates: dict[str, Any] | None = None, *,
                   file: str = "--set") -> SlurmSettings:
    """The resolved settings (see resolve_slurm)."""
    return resolve_slurm(abl, profile, updates, file=file)[0]


def settings_dict(settings: SlurmSettings) -> dict[str, Any]:
    return to_dict(settings)
