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


def _one_line(text: str) -> str:
    """`text` with its control characters escaped (a newline in a path from a spec, ...): an error is one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors and operating-system errors become one line on stderr and exit status 2
    (click's usage errors too, with the command's --help named); Ctrl-C is exit status 130."""
    try:  # newer typer carries its own copy of click
        from typer._click.exceptions import ClickException, UsageError
    except ImportError:  # pragma: no cover - typer on click itself
        from click.exceptions import ClickException, UsageError

    from dimr_lab.errors import UserError

    try:
        # not standalone: click's usage errors come here to be said in one line, like every other error
        code = app(args=argv, prog_name="dimr-lab", standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(N) from a command
            sys.exit(code)
    except SystemExit as exit_:
        if exit_.code not in (0, None):  # explicit failures pass through
            raise
    except UsageError as err:
        command = err.ctx.command_path if err.ctx is not None else "dimr-lab"
        if err.format_message():  # empty after no arguments, where the help has been shown
            print(f"error: {_one_line(err.format_message())} (see '{command} --help')", file=sys.stderr)
        sys.exit(2)
    except ClickException as err:  # click's other errors about what was given (a file option, ...)
        print(f"error: {_one_line(err.format_message())}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except UserError as err:
        print(f"error: {_one_line(str(err))}", file=sys.stderr)
        sys.exit(err.exit_code)
    except OSError as err:  # a full disk, a folder that became unwritable, a file that vanished, ...
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        print(f"error: {_one_line(f'{where}{err.strerror or err}')}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
