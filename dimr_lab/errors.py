"""User-facing errors: one clear line, exit status 2, no traceback (the CLI catches these)."""

from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """Bad input from the user: a spec, a file, a flag. The CLI prints `str(err)` and exits with 2."""

    exit_code = 2


class JobFailed(UserError):
    """The work failed for a reason outside the input (another process of a job died): one line, exit 1."""

    exit_code = 1


class SpecError(UserError):
    """A spec value is wrong: names the file, the dotted key and what is allowed."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file, self.key, self.message = file, key, message
        where = ": ".join(p for p in (file, key) if p)
        super().__init__(f"{where}: {message}" if where else message)

    def at(self, file: str | None = None, key_prefix: str | None = None) -> "SpecError":
        """The same error located in `file` and under `key_prefix` (keeps what is already set)."""
        key = self.key
        if key_prefix:
            key = f"{key_prefix}.{key}" if key else key_prefix
        return SpecError(self.message, file=self.file or file, key=key)


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The closest known name to `name`, or None when nothing is close."""
    match = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return match[0] if match else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)', or every name `name` begins when it begins several (no one of them is likelier:
    'guidance' -> guidance_scale, guidance_form, ...), or ''."""
    choices = list(choices)
    begun = [c for c in choices if str(c).startswith(str(name))] if name else []
    if len(begun) > 1:
        return f" (did you mean one of {', '.join(repr(c) for c in begun)}?)"
    hint = closest(name, choices)
    return f" (did you mean {hint!r}?)" if hint else ""


def unknown_name_message(kind: str, name: str, choices: Iterable[str]) -> str:
    """'unknown norm 'tdl'; known: a, b, c (did you mean 'tdln'?)'"""
    choices = sorted(choices)
    return f"unknown {kind} {name!r}; known: {', '.join(choices)}" + did_you_mean(name, choices)
