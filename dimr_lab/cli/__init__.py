"""The `dimr-lab` command line. Each group of commands lives in its own module and registers on `app`.

Keep imports here and in the command modules light: torch is imported inside command bodies only,
so `dimr-lab --help` answers at once.
"""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    name="dimr-lab",
    help="Architecture ablations of diffusion backbones (DiMR: multi-resolution networks, TD-LN).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root() -> None:
    """Architecture ablations of diffusion backbones (DiMR: multi-resolution networks, TD-LN)."""


# importing registers the commands
from dimr_lab.cli import data_cmds, model_cmds, official_cmds, run_cmds, table_cmds, train_cmds  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors and operating-system errors become one line on stderr and exit status 2
    (usage errors too, by click); Ctrl-C is exit status 130 with one line."""
    from dimr_lab.errors import UserError

    try:
        app(args=argv, prog_name="dimr-lab")
    except SystemExit as exit_:
        if exit_.code not in (0, None):  # click's usage errors (2) and explicit failures pass through
            raise
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except OSError as err:  # a full disk, a folder that became unwritable, a file that vanished, ...
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
