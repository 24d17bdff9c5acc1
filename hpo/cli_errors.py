"""One line for a command line that does not parse: ``error: Invalid value for '--n-trials': ...``, exit 2.

Typer (click) prints a usage block and a boxed message for a bad flag; hpo's contract is one ``error:`` line for
every bad input, flags included (README, "Bad input"). :class:`OneLineErrorGroup` is the app's group class.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import typer
import typer.core
from typer.exceptions import TyperException

from hpo.render import visible


class OneLineErrorGroup(typer.core.TyperGroup):
    """A typer group whose usage errors (bad value, unknown option, missing argument) print one ``error:`` line
    naming the flag and exit 2; ``hpo`` alone still prints the help."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except TyperException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":
                exc.show()  # type: ignore[attr-defined]
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)
            hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
            message = " ".join(visible(exc.format_message()).split())
            sys.stderr.write(f"error: {message}{hint}\n")
            sys.exit(2 if exc.exit_code in (1, 2) else exc.exit_code)
        except typer.Abort:
            sys.stderr.write("error: aborted\n")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)
