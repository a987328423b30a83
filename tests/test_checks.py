"""fast3d.checks: each check accepts what it should (returning the canonical type), refuses what it
should, and its message names the argument, the expected and the received."""

import fractions
import math
import re

import numpy as np
import pytest
import torch

from fast3d import checks


@pytest.mark.parametrize("x", [1, 7, 2**40, np.int64(3), np.uint8(255)])
def test_positive_int_accepts(x):
    out = checks.positive_int("n", x)
    assert type(out) is int and out == int(x)


@pytest.mark.parametrize("x", [0, -3, True, False, 2.0, "2", None, np.float32(2), [1]])
def test_positive_int_refuses(x):
    with pytest.raises(ValueError, match=rf"^n must be a positive integer; got {re.escape(repr(x))}$"):
        checks.positive_int("n", x)


def test_positive_int_optional_and_note():
    assert checks.positive_int("capacity", None, optional=True) is None
    with pytest.raises(ValueError, match=r"^capacity must be None or a positive integer \(tile pairs\); got 0$"):
        checks.positive_int("capacity", 0, optional=True, note="tile pairs")
    with pytest.raises(ValueError, match=r"^capacity must be a positive integer; got None$"):
        checks.positive_int("capacity", None)


def test_nonneg_int():
    assert checks.nonneg_int("k", 0) == 0
    with pytest.raises(ValueError, match=r"^k must be an integer >= 0; got -1$"):
        checks.nonneg_int("k", -1)


@pytest.mark.parametrize("lo, hi, bad, expected", [
    (0, 3, 4, r"an integer in \[0, 3\]"),
    (0, 3, -1, r"an integer in \[0, 3\]"),
    (2, None, 1, r"an integer >= 2"),
    (None, 5, 6, r"an integer <= 5"),
    (None, None, 1.5, r"an integer"),
])
def test_integer_ranges(lo, hi, bad, expected):
    for ok in {lo, hi} - {None}:
        assert checks.integer("x", ok, lo, hi) == ok
    with pytest.raises(ValueError, match=rf"^x must be {expected}; got {re.escape(repr(bad))}$"):
        checks.integer("x", bad, lo, hi)


@pytest.mark.parametrize("kw, good, bad, expected", [
    (dict(lo=0.0, hi=1.0, hi_open=True), [0, 0.5, 0.999], [1.0, -0.1], r"a real number in \[0, 1\)"),
    (dict(lo=0.0, hi=1.0, lo_open=True), [1, 1e-9], [0.0, 1.5], r"a real number in \(0, 1\]"),
    (dict(lo=0.0, lo_open=True), [1e-30, 1e30], [0, -1.0], r"a positive real number"),
    (dict(lo=0.0), [0, 3.5], [-1e-9], r"a real number >= 0"),
    (dict(lo=0.5, lo_open=True), [0.6], [0.5], r"a real number > 0\.5"),
    (dict(hi=2.0, hi_open=True), [-5, 1.9], [2.0], r"a real number < 2"),
    (dict(hi=2.0), [2], [2.1], r"a real number <= 2"),
    (dict(), [-1e300, 0, fractions.Fraction(1, 3), np.float16(1)], [math.nan, math.inf, -math.inf, True, "1", None,
                                                                       torch.tensor(1.0)], r"a real number"),
])
def test_real_ranges(kw, good, bad, expected):
    for x in good:
        out = checks.real("r", x, **kw)
        assert type(out) is float and out == float(x)
    for x in bad:
        with pytest.raises(ValueError, match=rf"^r must be {expected}; got {re.escape(repr(x))}$"):
            checks.real("r", x, **kw)


def test_real_optional():
    assert checks.real("scale", None, 0.0, lo_open=True, optional=True) is None
    with pytest.raises(ValueError, match=r"^scale must be None or a positive real number; got -1$"):
        checks.real("scale", -1, 0.0, lo_open=True, optional=True)


def test_one_of():
    assert checks.one_of("mode", "RGB", ("RGB", "D")) == "RGB"
    assert checks.one_of("k", 1, [0, 1]) == 1
    with pytest.raises(ValueError, match=r"^mode must be one of \('RGB', 'D'\); got 'RGBD'$"):
        checks.one_of("mode", "RGBD", ("RGB", "D"))
    with pytest.raises(ValueError, match=r"^k must be one of \(0, 1\); got True$"):
        checks.one_of("k", True, (0, 1))
    with pytest.raises(ValueError, match=r"^k must be one of \(0, 1\); got \[1\]$"):
        checks.one_of("k", [1], iter([0, 1]))


def test_boolean():
    assert checks.boolean("flag", False) is False
    for x in (1, 0, None, "True", torch.tensor(True), np.bool_(True)):
        with pytest.raises(ValueError, match=rf"^flag must be a bool; got {re.escape(repr(x))}$"):
            checks.boolean("flag", x)


def test_check_shape_binds_dims(gen):
    batch = tuple(torch.randint(1, 4, (int(torch.randint(0, 3, (), generator=gen)),), generator=gen).tolist())
    n, c = (int(s) for s in torch.randint(1, 9, (2,), generator=gen))
    means = torch.empty(*batch, n, 3)
    d = checks.check_shape(means, "[..., N, 3]", "means")
    assert d == {"...": batch, "N": n}
    d2 = checks.check_shape(torch.empty(*batch, c, 4, 4), "[..., C, 4, 4]", "viewmats", d)
    assert d2 == {"...": batch, "N": n, "C": c} and d == {"...": batch, "N": n}  # the input dict is kept
    assert checks.check_shape(torch.empty(*batch, c, n, 2), "[..., C, N, 2]", "m", d2) == d2
    assert checks.check_shape(torch.empty(n, n), "[N, N]", "square") == {"N": n}
    assert checks.check_shape(torch.empty(()), "[]", "scalar") == {}
    assert checks.check_shape(torch.empty(2, 5, 3), "[B, ..., 3]", "x") == {"B": 2, "...": (5,)}


@pytest.mark.parametrize("shape, spec, dims, expected", [
    ((7, 4), "[..., N, 3]", {}, r"\[\.\.\., N, 3\]"),
    ((2,), "[..., N, 3]", {}, r"\[\.\.\., N, 3\]"),
    ((2, 6, 4), "[..., N, 4]", {"...": (2,), "N": 7}, r"\[\.\.\., N, 4\] with \.\.\. = \[2\], N = 7"),
    ((3, 6, 4), "[..., N, 4]", {"...": (2,), "N": 6}, r"\[\.\.\., N, 4\] with \.\.\. = \[2\], N = 6"),
    ((3, 4), "[N, N]", {}, r"\[N, N\]"),
    ((3, 4), "[N]", {"C": 5}, r"\[N\]"),
    ((3, 4), "[3, 4, 1]", {}, r"\[3, 4, 1\]"),
])
def test_check_shape_refuses(shape, spec, dims, expected):
    x = torch.empty(shape, dtype=torch.float16)
    got = re.escape(f"got {list(shape)} float16 on cpu")
    with pytest.raises(ValueError, match=rf"^x must have shape {expected}; {got}$"):
        checks.check_shape(x, spec, "x", dims)


def test_check_shape_bad_arguments():
    with pytest.raises(TypeError, match=r"^x must be a torch.Tensor of shape \[N, 3\]; got list$"):
        checks.check_shape([[0.0] * 3], "[N, 3]", "x")
    for spec in ("N, 3", "[N, 3.5]", "[..., N, ...]", "[-1]"):
        with pytest.raises(ValueError, match=r"^shape"):
            checks.check_shape(torch.empty(2, 3), spec, "x")


def test_check_shape_random_specs(gen):
    """Random specs: a tensor built to match passes and binds its sizes; one dim changed fails."""
    def draw(n):
        return int(torch.randint(0, n, (), generator=gen))

    for _ in range(200):
        names = ["A", "B", "C"]
        tokens, sizes, bound = [], [], {}
        for _ in range(draw(4)):
            kind = draw(3)
            if kind == 0:                       # a literal
                s = draw(5)
                tokens.append(str(s))
            else:                               # a name, maybe seen before
                nm = names[draw(3)]
                bound.setdefault(nm, 1 + draw(4))
                s = bound[nm]
                tokens.append(nm)
            sizes.append(s)
        batch = tuple(1 + draw(3) for _ in range(draw(3)))
        at = draw(len(tokens) + 1)             # where "..." goes
        spec = "[" + ", ".join(tokens[:at] + ["..."] + tokens[at:]) + "]"
        shape = sizes[:at] + list(batch) + sizes[at:]
        d = checks.check_shape(torch.empty(shape), spec, "x")
        assert d == dict(bound, **{"...": batch})
        # Change one non-batch dim: the named size no longer agrees, or the literal differs.
        if tokens:
            i = draw(len(tokens))
            nm = tokens[i]
            recurs = tokens.count(nm) > 1
            if nm.isdigit() or recurs:
                bad = list(shape)
                j = i if i < at else i + len(batch)
                bad[j] += 1
                with pytest.raises(ValueError, match=r"^x must have shape " + re.escape(spec)):
                    checks.check_shape(torch.empty(bad), spec, "x")
            else:
                with pytest.raises(ValueError, match=re.escape(f"with {nm} = {bound[nm] + 1}")):
                    checks.check_shape(torch.empty(shape), spec, "x", {nm: bound[nm] + 1})
