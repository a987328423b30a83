"""Argument checks: one vocabulary for every layer of fast3d (layer L0: imports only torch and the
standard library).

Each check takes the argument's name and value, returns the value in its canonical type (``int``,
``float``, ...) and otherwise raises with a message that names the argument, says what was expected
and shows what came, in the same words everywhere::

    width = positive_int("width", width)                  # width must be a positive integer; got 0
    eps = real("eps", eps, 0.0, 1.0, hi_open=True)        # eps must be a real number in [0, 1); got 1.0
    mode = one_of("mode", mode, ("RGB", "D"))             # mode must be one of ('RGB', 'D'); got 'RGBD'
    d = check_shape(means, "[..., N, 3]", "means")        # binds d["..."] (batch dims) and d["N"]
    check_shape(quats, "[..., N, 4]", "quats", d)         # quats must have shape [..., N, 4] with
                                                          #   ... = [2], N = 7; got [2, 6, 4] float32 on cpu

Scalar checks raise ValueError, also for a value of the wrong type (``9.0`` for an integer);
``bool`` is never accepted as a number (``True`` is an int to Python, not to a caller).
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from collections.abc import Iterable, Mapping

import torch

__all__ = ["integer", "positive_int", "nonneg_int", "real", "one_of", "boolean", "check_shape"]


def _fmt(v: float) -> str:
    """A bound as a user wrote it: 1 not 1.0, 0.5, inf."""
    return f"{v:g}"


def _expected(what: str, optional: bool, note: str) -> str:
    return ("None or " if optional else "") + what + (f" ({note})" if note else "")


def integer(name: str, x, lo: int | None = None, hi: int | None = None, *, optional: bool = False,
            note: str = "") -> int | None:
    """An integer in the closed range [lo, hi] (an end that is None is unbounded).

    Args:
        name: the argument's name, as the caller wrote it.
        x: the value (any ``numbers.Integral`` but ``bool``; ``None`` too if ``optional``).
        lo, hi: inclusive bounds.
        optional: accept ``None`` (returned as is).
        note: a few words on what the value means, shown after the expected range.

    Returns:
        ``int(x)``, or None.
    """
    if optional and x is None:
        return None
    if lo is not None and hi is not None:
        what = f"an integer in [{lo}, {hi}]"
    elif lo == 1:
        what = "a positive integer"
    elif lo is not None:
        what = f"an integer >= {lo}"
    elif hi is not None:
        what = f"an integer <= {hi}"
    else:
        what = "an integer"
    if (isinstance(x, bool) or not isinstance(x, numbers.Integral) or (lo is not None and x < lo)
            or (hi is not None and x > hi)):
        raise ValueError(f"{name} must be {_expected(what, optional, note)}; got {x!r}")
    return int(x)


def positive_int(name: str, x, *, optional: bool = False, note: str = "") -> int | None:
    """An integer >= 1 ("a positive integer"); see :func:`integer`."""
    return integer(name, x, 1, optional=optional, note=note)


def nonneg_int(name: str, x, *, optional: bool = False, note: str = "") -> int | None:
    """An integer >= 0; see :func:`integer`."""
    return integer(name, x, 0, optional=optional, note=note)


def real(name: str, x, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
         hi_open: bool = False, optional: bool = False, note: str = "") -> float | None:
    """A finite real number in the range from lo to hi, each end closed unless ``*_open``.

    NaN and the infinities are never accepted (they are not real numbers; a range bounded by
    ``math.inf`` is written with that end None). The message writes the range the way a reader
    reads it: ``a positive real number`` for (0, inf), ``a real number >= 0``, ``a real number in
    [0, 1)``.

    Args:
        name: the argument's name, as the caller wrote it.
        x: the value (any ``numbers.Real`` but ``bool``; ``None`` too if ``optional``).
        lo, hi: the ends (None: unbounded).
        lo_open, hi_open: exclude that end.
        optional: accept ``None`` (returned as is).
        note: a few words on what the value means, shown after the expected range.

    Returns:
        ``float(x)``, or None.
    """
    if optional and x is None:
        return None
    if lo is not None and hi is not None:
        what = f"a real number in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
    elif lo == 0 and lo_open:
        what = "a positive real number"
    elif lo is not None:
        what = f"a real number {'>' if lo_open else '>='} {_fmt(lo)}"
    elif hi is not None:
        what = f"a real number {'<' if hi_open else '<='} {_fmt(hi)}"
    else:
        what = "a real number"
    ok = not isinstance(x, bool) and isinstance(x, numbers.Real) and math.isfinite(x)
    if ok and lo is not None:
        ok = x > lo if lo_open else x >= lo
    if ok and hi is not None:
        ok = x < hi if hi_open else x <= hi
    if not ok:
        raise ValueError(f"{name} must be {_expected(what, optional, note)}; got {x!r}")
    return float(x)


def one_of(name: str, x, choices: Iterable):
    """One of ``choices`` (compared with ``==``, except that a bool only matches a bool: ``True``
    is not the choice ``1``).

    Returns:
        ``x``.
    """
    choices = tuple(choices)
    if not any(x == c and isinstance(x, bool) == isinstance(c, bool) for c in choices):
        raise ValueError(f"{name} must be one of {choices!r}; got {x!r}")
    return x


def boolean(name: str, x) -> bool:
    """A ``bool`` (not 0 or 1, not a tensor).

    Returns:
        ``x``.
    """
    if not isinstance(x, bool):
        raise ValueError(f"{name} must be a bool; got {x!r}")
    return x


_NAME = re.compile(r"[A-Za-z_][A-Za-z_0-9]*\Z")


@functools.lru_cache(maxsize=256)
def _parse_shape(shape: str) -> tuple[str | int, ...]:
    """``"[..., N, 3]"`` -> ``("...", "N", 3)``: at most one ``...`` (any number of dims, bound as a
    tuple), names (one size each, bound on first use), non-negative integer literals."""
    s = shape.strip()
    if not (s.startswith("[") and s.endswith("]")):
        raise ValueError(f"shape must be written as '[d0, d1, ...]'; got {shape!r}")
    body = s[1:-1].strip()
    tokens: list[str | int] = []
    for tok in (t.strip() for t in body.split(",")) if body else ():
        if tok == "..." or _NAME.match(tok):
            tokens.append(tok)
        elif tok.isdigit():
            tokens.append(int(tok))
        else:
            raise ValueError(f"shape {shape!r}: each dim must be '...', a name or an integer; got {tok!r}")
    if tokens.count("...") > 1:
        raise ValueError(f"shape {shape!r} has more than one '...'")
    return tuple(tokens)


def _fmt_dim(value) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def check_shape(x,             # a torch.Tensor of the shape `shape` describes (anything else: TypeError)
                shape: str, name: str, dims: Mapping[str, int | tuple[int, ...]] | None = None,
                ) -> dict[str, int | tuple[int, ...]]:
    """Check a tensor's shape against a shape string and bind its named dims.

    ``shape`` is written as in the shape comments, ``"[..., C, N, 3]"``: ``...`` stands for any
    number of dims (bound, as a tuple, under the key ``"..."``), a name for one dim of any size
    (bound on first use, equal wherever it recurs), an integer for a dim of that size. Names already
    in ``dims`` must match. Chaining the returned dict through the checks of a function's arguments
    checks that they agree::

        d = check_shape(means, "[..., N, 3]", "means")
        d = check_shape(viewmats, "[..., C, 4, 4]", "viewmats", d)
        d = check_shape(Ks, "[..., C, 3, 3]", "Ks", d)          # same batch dims and C as viewmats

    Args:
        x: the tensor.
        shape: the expected shape, as above.
        name: the argument's name, as the caller wrote it.
        dims: sizes bound by earlier checks (not modified).

    Returns:
        ``dims`` plus the names this shape bound.

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: the shape differs; the message prints ``shape`` with the values bound before
            this check, and the received shape, dtype and device.
    """
    dims = dims or {}
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}; got {type(x).__name__}")
    tokens = _parse_shape(shape)
    got = tuple(x.shape)
    bound = dict(dims)  # dims plus what this shape binds (dims, unchanged, is what the message shows)
    ok = x.dim() == len(tokens) if "..." not in tokens else x.dim() >= len(tokens) - 1
    if ok:
        # Match the dims before "..." at the front and those after it at the back.
        e = tokens.index("...") if "..." in tokens else len(tokens)
        n_tail = len(tokens) - e - 1 if "..." in tokens else 0
        pairs = list(zip(tokens[:e], got[:e])) + list(zip(tokens[e + 1:], got[len(got) - n_tail:]))
        if "..." in tokens:
            pairs.append(("...", got[e:len(got) - n_tail]))
        for tok, size in pairs:
            if isinstance(tok, int):
                ok = size == tok
            elif tok in bound:
                ok = bound[tok] == size
            else:
                bound[tok] = size
            if not ok:
                break
    if not ok:
        known = [f"{t} = {_fmt_dim(dims[t])}" for t in dict.fromkeys(tokens) if isinstance(t, str) and t in dims]
        where = f" with {', '.join(known)}" if known else ""
        dtype = str(x.dtype).replace("torch.", "")
        raise ValueError(f"{name} must have shape {shape}{where}; got {list(got)} {dtype} on {x.device}")
    return bound
