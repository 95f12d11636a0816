"""[slurm] of an ablation file: how `--executor slurm` submits its job array (torch-free).

Order: [slurm] <- the profile's "slurm.KEY" entries <- `--set slurm.KEY=V`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dimr_lab.errors import SpecError
from dimr_lab.spec.schema import field, from_dict, to_dict


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


def slurm_settings(abl: Any, profile: str = "tiny", updates: dict[str, Any] | None = None, *,
                   file: str = "--set") -> SlurmSettings:
    """[slurm] <- the profile's "slurm.KEY" entries <- --set slurm.KEY=V, validated (errors name their layer)."""
    base = from_dict(SlurmSettings, abl.slurm, file=str(abl.file), prefix="slurm")
    data = to_dict(base)
    prof = abl.profile_slurm.get(profile, {})
    if prof:
        data.update(prof)
        try:
            from_dict(SlurmSettings, data, file=str(abl.file), prefix=f"profile.{profile}.slurm")
        except SpecError as err:
            raise SpecError(err.message, file=str(abl.file), key=err.key) from None
    data.update(updates or {})
    return from_dict(SlurmSettings, data, file=file, prefix="slurm")
