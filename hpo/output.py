"""Tables that fit the terminal, for people; the column choice (``--columns``) shared with CSV.

A rich table left to itself breaks headers and names into pieces when the terminal is narrow (``params_batc h_size``,
3-letter fragments at 80 columns). Here every column is at least as wide as its header, headers are short labels
(``params_lr`` is shown as ``lr``, ``datetime_start`` as ``started``), and columns that do not fit are left out,
lowest priority (rightmost) first, with one line naming them; ``--columns`` picks and orders columns by name or label.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.table import Table
from rich.text import Text

from hpo.errors import HpoError
from hpo.render import visible

#: Short header labels for the long column names of ``trials``, ``best`` and ``studies``.
LABELS: dict[str, str] = {
    "datetime_start": "started",
    "datetime_complete": "completed",
    "epochs_reached": "epochs",
    "best_value": "best",
    "best_trial": "best#",
    "n_trials": "trials",
}
#: Columns whose cells are never cut (a name or number cut in two misleads); others fold when the terminal is narrow.
WHOLE: frozenset[str] = frozenset({"number", "name", "state", "value", "best_value", "param"})
MAX_WIDTH = 40  # no column wider than this while others are left out
LONG_WORD = 16  # a word in a cell longer than this may fold (a long path, an error message)
EDGE = 1  # a table's left border; each column adds its padding (2) and right border (1)
PER_COLUMN = 3


def label(column: str, columns: Sequence[str] = ()) -> str:
    """The header shown for a column: ``params_lr`` -> ``lr`` (unless another column is called ``lr``)."""
    if column.startswith("params_"):
        short = column.removeprefix("params_")
        return short if short not in columns else column
    short = LABELS.get(column, column)
    return short if short == column or f"params_{short}" not in columns else column  # a parameter's name wins


def pick(columns: Sequence[str], wanted: str | None) -> list[str]:
    """The columns named in ``wanted`` (comma-separated names or labels), in its order; all when None.

    Raises:
        HpoError: a name that is no column.
    """
    if not wanted:
        return list(columns)
    by_name = {c: c for c in columns} | {label(c, columns): c for c in columns}
    chosen: list[str] = []
    for part in wanted.split(","):
        name = part.strip()
        if not name:
            continue
        if name not in by_name:
            known = ", ".join(label(c, columns) for c in columns)
            raise HpoError(f"--columns: no column {name!r} (known: {known})")
        if by_name[name] not in chosen:
            chosen.append(by_name[name])
    return chosen


def _word(text: str) -> int:
    """The longest word of a cell, up to :data:`LONG_WORD`: a cell wraps at its spaces, and only a longer word
    folds."""
    return min(max((len(w) for w in text.split()), default=0), LONG_WORD)


@dataclass
class Fitted:
    table: Table
    hidden: list[str]

    def note(self) -> str | None:
        """One line naming the columns left out, or None."""
        if not self.hidden:
            return None
        return (
            f"{len(self.hidden)} more column(s) not shown at this width: {', '.join(self.hidden)} "
            "(widen the terminal, or pick with --columns)"
        )


def fit_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    width: int,
    title: str = "",
    cell: Callable[[Any], str] = str,
) -> Fitted:
    """A rich table of ``rows`` in at most ``width`` characters, every header whole.

    Columns are kept left to right while their headers fit (a column of names or values also needs its widest cell);
    the rest are listed in :attr:`Fitted.hidden`. Space left over widens the kept columns up to their widest cell;
    cells still too wide fold inside their column (never a header).
    """
    labels = {c: visible(label(c, columns)) for c in columns}  # names are data: control characters shown
    cells = {c: [visible(cell(r.get(c))) for r in rows] for c in columns}
    natural = {c: max([len(labels[c]), *(len(x) for x in cells[c])]) for c in columns}
    minimum = {c: natural[c] if c in WHOLE else max([len(labels[c]), *(_word(x) for x in cells[c])]) for c in columns}
    kept: list[str] = []
    used = EDGE
    for c in columns:
        need = min(max(minimum[c], 1), width) + PER_COLUMN
        if used + need > width and kept:
            continue
        kept.append(c)
        used += need
    widths = {c: max(minimum[c], 1) for c in kept}
    spare = width - used
    for c in kept:  # widen, left to right, up to the widest cell (a long text column is capped while others wait)
        grow = min(spare, min(natural[c], MAX_WIDTH if len(kept) < len(columns) else natural[c]) - widths[c])
        if grow > 0:
            widths[c] += grow
            spare -= grow
    table = Table(title=Text(visible(title)) if title else None, title_justify="left")  # never parsed as markup
    for c in kept:
        table.add_column(Text(labels[c]), width=widths[c], overflow="fold", no_wrap=False)
    for i in range(len(rows)):
        table.add_row(*[Text(cells[c][i]) for c in kept])
    return Fitted(table, [labels[c] for c in columns if c not in kept])


__all__ = ["Fitted", "LABELS", "fit_table", "label", "pick"]
