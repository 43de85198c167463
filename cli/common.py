"""Helpers shared by every command: error mapping, JSON output, progress bars, logging setup."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import sys

import click

from arbs.errors import ArbsError


def arbs_errors(f):
    """Decorator: an ArbsError becomes a click.ClickException (message on stderr, exit status 1).

    Other exceptions propagate unchanged (they are bugs, and the traceback is wanted).
    """

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except ArbsError as e:
            raise click.ClickException(str(e)) from e

    return wrapper


def _jsonable(o):
    """json.dumps ``default``: numpy scalars/arrays, tuples, paths."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__fspath__"):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _finite(o):
    """Replace NaN/inf floats by None so the document is strict JSON."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def echo_json(doc) -> None:
    """Print exactly one strict JSON document (NaN/inf -> null) on stdout."""
    click.echo(json.dumps(_finite(json.loads(json.dumps(doc, default=_jsonable))), allow_nan=False))


def _stderr_tqdm():
    from tqdm import tqdm

    class StderrTqdm(tqdm):
        """tqdm whose ``write`` (lines printed above the bar) also defaults to stderr, not stdout."""

        @classmethod
        def write(cls, s, file=None, end="\n", nolock=False):
            return super().write(s, file=sys.stderr if file is None else file, end=end, nolock=nolock)

    return StderrTqdm


@contextlib.contextmanager
def progress_bar(total: int | None = None, desc: str | None = None, **kwargs):
    """A tqdm bar on stderr; ``bar.write(line)`` prints above it, also on stderr (stdout stays clean
    for ``--json``). The bar is hidden when stderr is not a terminal unless ``disable=False``.
    """
    kwargs.setdefault("disable", None)  # tqdm: None disables the bar on non-TTY output
    kwargs.setdefault("dynamic_ncols", True)
    bar = _stderr_tqdm()(total=total, desc=desc, file=sys.stderr, **kwargs)
    try:
        yield bar
    finally:
        bar.close()


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at emit time (so click's test runner captures it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # logging must never crash the command; logging's own policy
            self.handleError(record)


def setup_logging(verbosity: int) -> None:
    """Log arbs messages to stderr: WARNING by default, INFO with -v, DEBUG with -vv."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    for name in ("arbs", "arbs_cli"):
        logger = logging.getLogger(name)
        for h in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
            logger.removeHandler(h)
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(level)
