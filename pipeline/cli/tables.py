"""Tables that fit the terminal's width without cutting a value into fragments.

:func:`render` lays out already formatted cells (:mod:`pipeline.cli.cells`):

1. At their natural widths when the table fits.
2. Otherwise text columns wrap between words (a list such as
   ``CIRCUIT_BREAKER_OPEN, OPTIMIZE_LATENCY`` puts one item per line), headers
   wrap after an underscore (``communication_`` / ``score``), and numbers and
   times are never wrapped; the spare width goes to the columns that want it
   most. A word is broken only when it is longer than :data:`LONG_WORD`
   characters.
3. When even that does not fit, each row is printed as a block of
   ``column  value`` lines (as ``psql``'s expanded display does), which fits
   any width the column names fit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

from rich.cells import cell_len

__all__ = ["LONG_WORD", "fit_widths", "render", "wrap"]

LONG_WORD: Final = 24
"""A word longer than this may be broken (after ``_ - . /`` where it can) to fit."""
_BREAKS = re.compile(r"[^_\-./]*[_\-./]|[^_\-./]+$")


def _pieces(word: str, width: int) -> list[str]:
    """``word`` in pieces of at most ``width``: after ``_ - . /`` where possible."""
    out: list[str] = []
    line = ""
    for part in _BREAKS.findall(word):
        while cell_len(part) > width:  # no break point: cut it
            room = width - cell_len(line)
            if room <= 0:
                out.append(line)
                line, room = "", width
            line, part = line + part[:room], part[room:]
            out.append(line)
            line = ""
        if cell_len(line + part) > width:
            out.append(line)
            line = ""
        line += part
    if line or not out:
        out.append(line)
    return out


def wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` cells, broken between words (see the module
    docstring); its own line breaks are kept."""
    width = max(width, 1)
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if cell_len(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            pieces = _pieces(word, width) if cell_len(word) > width else [word]
            lines.extend(pieces[:-1])
            line = pieces[-1]
        lines.append(line)
    return lines


def _header_min(header: str) -> int:
    return max((cell_len(p) for p in _BREAKS.findall(header)), default=0)


def _overhead(columns: int) -> int:
    """What separates the columns: two spaces (padding collapsed around a blank rule); no
    outer edge."""
    return 2 * max(columns - 1, 0)


def fit_widths(headers: Sequence[str], rows: Sequence[Sequence[str]],
               fixed: Sequence[bool], width: int) -> list[int] | None:
    """Content widths of the columns so that the table is at most ``width`` wide, or None
    when it cannot be done without breaking numbers (``fixed`` columns) or words."""
    n = len(headers)
    lines = [[ln for row in rows for ln in row[i].split("\n")] for i in range(n)]
    natural = [max([cell_len(headers[i]), *(cell_len(ln) for ln in lines[i])])
               for i in range(n)]
    room = width - _overhead(n)
    if sum(natural) <= room:
        return natural
    mins = []
    for i in range(n):
        content = max((cell_len(ln) for ln in lines[i]), default=0)
        if fixed[i]:
            low = content
        else:
            words = max((cell_len(w) for ln in lines[i] for w in ln.split(" ")), default=0)
            low = min(content, min(words, LONG_WORD))
        mins.append(min(max(low, _header_min(headers[i])), natural[i]))
    spare = room - sum(mins)
    if spare < 0:
        return None
    # the cheapest columns first get all they want (an unwrapped header, a short text),
    # then the spare width is shared by the rest in proportion to what they want
    widths = list(mins)
    wanting = sorted(range(n), key=lambda i: natural[i] - mins[i])
    while wanting and natural[wanting[0]] - widths[wanting[0]] <= spare / len(wanting):
        i = wanting.pop(0)
        spare -= natural[i] - widths[i]
        widths[i] = natural[i]
    total = sum(natural[i] - widths[i] for i in wanting)
    shares = {i: spare * (natural[i] - widths[i]) / total for i in wanting}
    for i, share in shares.items():
        widths[i] += int(share)
    left = room - sum(widths)
    for i in sorted(shares, key=lambda i: shares[i] - int(shares[i]), reverse=True)[:left]:
        widths[i] += 1
    return widths


def render(headers: Sequence[str], rows: Sequence[Sequence[str]], fixed: Sequence[bool],
           width: int) -> Any:
    """A rich renderable of the table (or of its rows as blocks) at most ``width`` wide."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    widths = fit_widths(headers, rows, fixed, width)
    if widths is None:
        return _blocks(headers, rows, width)
    cells = [[wrap(row[i], widths[i]) for i in range(len(headers))] for row in rows]
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
                  show_lines=any(len(c) > 1 for row in cells for c in row))
    for header, w, right in zip(headers, widths, fixed, strict=True):
        table.add_column(Text("\n".join(wrap(header, w))), width=w, no_wrap=True,
                         justify="right" if right else "left")
    for row in cells:
        table.add_row(*(Text("\n".join(c)) for c in row))
    return table


def _blocks(headers: Sequence[str], rows: Sequence[Sequence[str]], width: int) -> Any:
    """Each row as ``column  value`` lines under a ``-[ row N ]`` rule."""
    from rich.text import Text

    name_w = min(max((cell_len(h) for h in headers), default=0), max(width // 2, 1))
    value_w = max(width - name_w - 2, 1)
    out = Text()
    for r, row in enumerate(rows, 1):
        rule = f"-[ row {r} ]"
        out.append(rule + "-" * max(width - cell_len(rule), 0) + "\n", style="dim")
        for header, value in zip(headers, row, strict=True):
            names = wrap(header, name_w)
            values = wrap(value, value_w)
            for k in range(max(len(names), len(values))):
                name = names[k] if k < len(names) else ""
                value = values[k] if k < len(values) else ""
                pad = " " * (name_w - cell_len(name) + 2) if value else ""
                out.append(name, style="bold")
                out.append(pad + value + "\n")
    if not rows:
        out.append("\n".join(wrap("columns: " + ", ".join(headers), width)) + "\n")
    out.rstrip()
    return out
