"""What every command-line tool shares: flag types that refuse bad values, a help page that
shows defaults, and one exit for a user error found after parsing.

A user error ends a tool with exit status 2 and one line that names the flag or the file
and says what to do, never a traceback:

- a value wrong on its own (``--load-factor -0.1``, ``--lookaheads 1,x``) is refused by its
  flag's ``type=`` converter here: argparse prints the usage and
  ``PROG: error: argument --load-factor: ...``;
- a problem found later (two flags that disagree, a data file that is too short or
  malformed, a batch larger than the cache) raises ``ValueError`` or ``OSError`` in the
  library, and :func:`user_errors` turns it into ``PROG: error: ...``. Set
  ``SCRATCHPIPE_TRACEBACK=1`` to see the traceback instead.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser(prog="tool", formatter_class=HelpFormatter)
    >>> _ = p.add_argument("--lookaheads", type=int_list(minimum=0), default=[1], help="L values")
    >>> p.parse_args(["--lookaheads", "0,2"]).lookaheads
    [0, 2]
    >>> int_list(minimum=0)("1,x")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected a comma list of integers >= 0 (like 1,4), got '1,x'
    >>> "L values (default: 1)" in p.format_help()
    True
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, List, NoReturn, Optional, Sequence, TypeVar

from torchrec_scratchpipe import defaults

T = TypeVar("T")

#: Environment variable that makes :func:`user_errors` re-raise (with its traceback).
TRACEBACK_ENV = "SCRATCHPIPE_TRACEBACK"
#: Exit status of a user error (argparse's own).
USAGE_EXIT = 2


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module doc as written, and every option's default after its help text.

    A default of ``None`` is not shown, nor a switch's, nor one the help text already
    states (it says "default").
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is argparse.SUPPRESS or action.nargs == 0 or not action.option_strings
                or "default" in text):
            return text
        if isinstance(default, (list, tuple)):
            default = ",".join(str(v) for v in default)
        return f"{text} (default: {default})".lstrip() if text else f"(default: {default})"


def fail(prog: str, message: str) -> NoReturn:
    """Print ``PROG: error: MESSAGE`` (one line) to stderr and exit with status 2."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(USAGE_EXIT)


@contextlib.contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Turn a ``ValueError`` or ``OSError`` raised in the block into :func:`fail`.

    The library raises ``ValueError`` (``CapacityError`` too) for bad input, with a message
    that says what was wrong and what to do; ``OSError`` is a file that cannot be read.

    Example:
        >>> with user_errors("tool"):
        ...     raise ValueError("--steps 0: give at least one step")
        Traceback (most recent call last):
        ...
        SystemExit: 2
    """
    try:
        yield
    except (ValueError, OSError) as e:
        if os.environ.get(TRACEBACK_ENV):
            raise
        fail(prog, _describe(e))


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return str(e)


def converter(fn: Callable[[str], T]) -> Callable[[str], T]:
    """A ``type=`` for argparse from a function that raises ``ValueError`` with a clear message
    (argparse would otherwise print only "invalid <name> value")."""

    def convert(text: str) -> T:
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = fn.__name__
    return convert


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def int_at_least(minimum: int) -> Callable[[str], int]:
    """``type=`` for an integer ``>= minimum``.

    Example:
        >>> int_at_least(1)("3")
        3
    """

    def convert(text: str) -> int:
        value = _int(text, f"an integer >= {minimum}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    convert.__name__ = f"integer >= {minimum}"
    return convert


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def int_list(minimum: int = 0) -> Callable[[str], List[int]]:
    """``type=`` for a non-empty comma list of integers ``>= minimum`` (``"1,4"``)."""

    def convert(text: str) -> List[int]:
        what = f"a comma list of integers >= {minimum} (like 1,4)"
        try:
            values = [int(p) for p in text.split(",") if p.strip()]
        except ValueError:
            values = []
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values

    convert.__name__ = "integer list"
    return convert


def name_list(choices: Sequence[str]) -> Callable[[str], List[str]]:
    """``type=`` for a non-empty comma list of names from ``choices``.

    Example:
        >>> name_list(["fused", "scratchpipe"])("fused,uvm")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: unknown 'uvm'; choose a comma list of fused, scratchpipe
    """

    def convert(text: str) -> List[str]:
        names = [p.strip() for p in text.split(",") if p.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            what = f"unknown {', '.join(map(repr, bad))}" if bad else "empty list"
            raise argparse.ArgumentTypeError(f"{what}; choose a comma list of {', '.join(choices)}")
        return names

    convert.__name__ = "name list"
    return convert


def finite_float(text: str) -> float:
    """A finite float (not nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite float ``> 0``."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A float in ``(0, 1]``: a share of a table's rows (a load factor) or of its lookups.

    Example:
        >>> fraction("0.05")
        0.05
    """
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (a fraction, like 0.1), got {text}")
    return value


def existing_file(text: str) -> str:
    """A path to a readable file (kept as given)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(
            f"{text}: {'is a folder' if path.is_dir() else 'no such file'}; give the path of an existing file")
    return text


def data_source(text: str) -> str:
    """``synthetic``, ``trace:FILE`` or ``criteo:FILE[,FILE...]``, the files existing.

    Example:
        >>> data_source("synthetic")
        'synthetic'
    """
    kind, sep, rest = text.partition(":")
    if text == "synthetic":
        return text
    if not sep or kind not in ("trace", "criteo") or not rest:
        raise argparse.ArgumentTypeError(f"expected synthetic, trace:FILE or criteo:FILE[,FILE...], got {text!r}")
    files = rest.split(",") if kind == "criteo" else [rest]
    for f in files:
        existing_file(f)
    return text


def tool_window(lookahead: int, horizon: Optional[int], flag: str = "--lookahead") -> int:
    """The horizon a tool runs lookahead ``lookahead`` with (``defaults.horizon_for``), checked
    by ``defaults.check_window``; an error names the flags.

    Example:
        >>> tool_window(4, None), tool_window(2, 8)
        (64, 8)
    """
    h = defaults.horizon_for(lookahead, horizon)
    try:
        return defaults.check_window(lookahead, h)
    except ValueError as e:
        raise ValueError(f"{flag} {lookahead} with --horizon {h}: {e}") from None
