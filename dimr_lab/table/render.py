"""Sections of text cells -> rich (plain text), markdown or LaTeX (booktabs). Knows nothing of metrics."""

from __future__ import annotations

import io
import re
import textwrap
from dataclasses import dataclass, field

FIT = 120  # the compact tables fit a terminal this wide


@dataclass
class Section:
    """One table: a title (with its key, e.g. the ablation's name), note lines, header and cells."""

    title: str
    key: str
    header: list[str]
    rows: list[list[str]]
    n_text: int = 1                       # leading columns of text (left-aligned); numbers right-aligned
    notes: list[str] = field(default_factory=list)
    left: tuple[int, ...] = ()            # more left-aligned columns (text after the numbers)

    def is_text(self, i: int) -> bool:
        return i < self.n_text or i in self.left

    def title_line(self) -> str:
        head = f"{self.title} ({self.key})" if self.key and self.key != self.title else self.title
        return " — ".join([head, *self.notes]) if self.notes else head


# ------------------------------------------------------------------------------------ rich

def _header_lines(header: str, width: int) -> str:
    """header broken after '_', ' ' or '.' into lines of at most width characters (words never split)."""
    words = re.findall(r"[^_ .]+[_ .]?|[_ .]", header)
    lines: list[str] = []
    for word in words:
        if lines and len(lines[-1]) + len(word.rstrip()) <= width:
            lines[-1] += word
        else:
            lines.append(word)
    return "\n".join(line.rstrip() for line in lines)


def _min_widths(sec: Section, headers: list[str]) -> list[int]:
    """The narrowest each column can be: text labels down to their longest word, everything else whole."""
    out = []
    for i, h in enumerate(headers):
        texts = [*h.splitlines(), *(r[i] for r in sec.rows)]
        wraps = 0 < i < sec.n_text
        out.append(max((len(w) for t in texts for w in (t.split() if wraps else [t])), default=1))
    return out


def _rich_table(sec: Section, headers: list[str], width: int = 1000) -> str:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # width 1000: a virtual console wider than any table, so cells never wrap and the table takes the width
    # it needs; a narrower one lets rich wrap the text columns after the first (labels, never numbers)
    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
    # no padding left of a cell: columns are two characters apart (padding and the blank divider)
    out = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for i, (h, least) in enumerate(zip(headers, _min_widths(sec, headers))):
        out.add_column(h, justify="left" if sec.is_text(i) else "right", no_wrap=not 0 < i < sec.n_text,
                       min_width=least)
    for cells in sec.rows:
        out.add_row(*cells)
    console.print(out)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())


def _width(text: str) -> int:
    return max(map(len, text.splitlines()), default=0)


def _rich_section(sec: Section, fit: int | None) -> str:
    """A section's title lines and its table, made to fit `fit` columns: first long headers go onto
    several lines (the ones that save most first), then long labels wrap."""
    headers = list(sec.header)
    text = _rich_table(sec, headers)
    if fit is not None and _width(text) > fit:
        cells = [max([len(r[i]) for r in sec.rows] + [3]) for i in range(len(headers))]
        by_saving = sorted(range(len(headers)), key=lambda i: len(headers[i]) - cells[i], reverse=True)
        for i in by_saving:
            if len(headers[i]) <= cells[i] or _width(text) <= fit:
                break
            headers[i] = _header_lines(headers[i], cells[i])
            text = _rich_table(sec, headers)
        if _width(text) > fit:
            # never narrower than the columns' minimum: rich would crop numbers to make it fit
            least = sum(_min_widths(sec, headers)) + 2 * len(headers)
            text = _rich_table(sec, headers, width=max(fit, least))
    title = textwrap.fill(sec.title_line(), width=fit or 1000, subsequent_indent="  ")
    return f"{title}\n{text}"


def render_rich(sections: list[Section], legend: str = "", *, fit: int | None = FIT) -> str:
    """Plain-text tables drawn by rich (no colour codes), one per section; fit=None: never wrap headers."""
    parts = [_rich_section(sec, fit) for sec in sections]
    if legend:
        parts.append(textwrap.fill(legend, width=fit or FIT))
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------ markdown

def _md(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(sections: list[Section], legend: str = "") -> str:
    """A heading, an italic note line and a pipe table per section."""
    parts = []
    for sec in sections:
        head = f"## {sec.title} (`{sec.key}`)" if sec.key and sec.key != sec.title else f"## {sec.title}"
        lines = [head, ""]
        if sec.notes:
            lines += ["_" + "; ".join(sec.notes).replace("_", "\\_") + "_", ""]
        lines += ["| " + " | ".join(map(_md, sec.header)) + " |",
                  "|" + "|".join(":---" if sec.is_text(i) else "---:" for i in range(len(sec.header))) + "|"]
        lines += ["| " + " | ".join(map(_md, cells)) + " |" for cells in sec.rows]
        parts.append("\n".join(lines))
    if legend:
        parts.append(legend)
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------ LaTeX

_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_SYMBOLS = {" ± ": r" $\pm$ ", "Δ": r"$\Delta$", "→": r"$\to$", "–": "--", "—": "---", "≈": r"$\approx$"}


def latex(text: str) -> str:
    """text with LaTeX specials escaped and ±, Δ, → as math."""
    out = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)
    for symbol, tex in _LATEX_SYMBOLS.items():
        out = out.replace(symbol, tex)
    return out


def render_latex(sections: list[Section], legend: str = "") -> str:
    """A booktabs tabular per section; its title and notes as comments above it."""
    parts = []
    for sec in sections:
        lines = [f"% {line}" for line in textwrap.wrap(sec.title_line(), 110)]
        spec = "".join("l" if sec.is_text(i) else "r" for i in range(len(sec.header)))
        lines += [r"\begin{tabular}{" + spec + "}", r"\toprule",
                  " & ".join(map(latex, sec.header)) + r" \\", r"\midrule"]
        lines += [" & ".join(map(latex, cells)) + r" \\" for cells in sec.rows]
        lines += [r"\bottomrule", r"\end{tabular}"]
        parts.append("\n".join(lines))
    if legend:
        parts.append("\n".join(f"% {line}" for line in textwrap.wrap(legend, 110)))
    return "\n\n".join(parts) + "\n"


def render(sections: list[Section], fmt: str, legend: str = "", *, fit: int | None = FIT) -> str:
    """sections in one of the text formats (rich, markdown, latex)."""
    if fmt == "rich":
        return render_rich(sections, legend, fit=fit)
    if fmt == "markdown":
        return render_markdown(sections, legend)
    return render_latex(sections, legend)
