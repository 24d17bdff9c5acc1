"""Showing what users and other processes wrote (study names, parameters, attributes, errors) as data.

Everything stored is shown literally: rich markup is escaped (``[bold`` prints as ``[bold``), control characters
are made visible (a newline prints as ``\\n``, an ANSI escape as ``\\x1b``), names in a command printed for copying
are shell-quoted, and CSV cells that a spreadsheet would run as a formula are neutralised (OWASP's advice: a cell
starting with ``= + - @`` or a tab or carriage return gets a leading ``'``).
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from rich.markup import escape
from rich.text import Text

#: C0 and C1 control characters, DEL, and the Unicode line / paragraph separators and bidi overrides.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
#: What a spreadsheet runs as a formula when a cell starts with it (OWASP, "CSV Injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _escape_char(m: re.Match[str]) -> str:
    c = m.group(0)
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c) or (
        f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
    )


def visible(value: Any) -> str:
    """``str(value)`` with every control character written as an escape (``\\n``, ``\\x1b``, ``\\u202e``)."""
    return _CONTROL.sub(_escape_char, str(value))


def lit(value: Any) -> str:
    """``value`` for an f-string printed by rich: control characters visible, markup escaped."""
    return escape(visible(value))


def text(value: Any, style: str = "") -> Text:
    """``value`` as a rich :class:`~rich.text.Text` (never parsed as markup), control characters visible."""
    return Text(visible(value), style=style)


def shell_quote(value: Any, always: bool = False) -> str:
    """``value`` quoted for a POSIX shell, as one word (``always``: in quotes even when it needs none); control
    characters as a ``$'...'`` word (bash, zsh)."""
    s = str(value)
    if _CONTROL.search(s):
        body = _CONTROL.sub(_escape_char, s.replace("\\", "\\\\").replace("'", "\\'"))
        return f"$'{body}'"
    if always:
        return "'" + s.replace("'", "'\"'\"'") + "'"
    return shlex.quote(s)


def csv_cell(value: Any, rendered: str) -> str:
    """A CSV cell: ``rendered`` (the cell's text), neutralised with a leading ``'`` when ``value`` is text that
    starts like a formula. Numbers (``-0.5``) stay as they are: only strings can carry a formula. A carriage return
    in text is written ``\\r`` (csv leaves a cell holding one unquoted when lines end in ``\\n``)."""
    if not isinstance(value, str):
        return rendered
    rendered = rendered.replace("\r", "\\r")  # a bare CR is not quoted by csv with "\n" line ends: shown as \r
    return "'" + rendered if rendered.startswith(FORMULA_START) else rendered


__all__ = ["FORMULA_START", "csv_cell", "lit", "shell_quote", "text", "visible"]
