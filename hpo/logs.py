"""How hpo's processes log: one line per event, with its time (``docker logs``, Slurm output files, a pipe).

hpo's own records keep their tracebacks (an objective's error is worth its stack); a record from a library (Optuna,
SQLAlchemy: a connection pool's "Exception during reset" while the database restarts, a warning quoting an SQL
statement and its parameters) becomes one line: its first line, without the statement, the parameters or the link
SQLAlchemy appends, and with its exception's type and first line instead of a traceback."""

from __future__ import annotations

import logging
import re

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"
_CUT = re.compile(r"\[SQL:|\[parameters:|\(Background on this error at:")


def one_line(text: str, limit: int = 500) -> str:
    """``text`` up to the first SQL statement, parameters or link SQLAlchemy adds, on one line."""
    return " ".join(_CUT.split(text, maxsplit=1)[0].split())[:limit]


class OneLine(logging.Filter):
    """A handler filter folding library records to one line (see the module's docstring); hpo's pass as they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "hpo" or record.name.startswith("hpo."):
            return True
        msg = one_line(record.getMessage())
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            msg = f"{msg} ({type(exc).__name__}: {one_line(str(exc), 300)})"
        record.msg, record.args = msg, None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def setup(verbose: bool) -> None:
    """The root logger (WARNING, INFO with ``-v``: timestamped) and Optuna's own handler (its own format, which has
    the time): library records on one line."""
    import optuna

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=FORMAT, datefmt=DATEFMT)
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    for logger in (logging.getLogger(), logging.getLogger("optuna")):
        for handler in logger.handlers:
            if not any(isinstance(f, OneLine) for f in handler.filters):
                handler.addFilter(OneLine())
