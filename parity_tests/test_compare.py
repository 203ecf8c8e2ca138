"""The comparison helper and tolerance table themselves: they must fail when they should."""

import pytest
import torch

from pare.parity import TOLERANCES, assert_parity, compare, tolerance_for


def test_identical_fp32_tensors_pass_and_report_zero():
    x = torch.randn(2, 3, 4)
    r = compare("x", x, x.clone())
    assert r.passed and r.max_abs == 0 and r.rel_l2 == 0 and r.mismatches == 0


def test_fp32_scale_error_of_1e_3_fails_and_is_located():
    x = torch.randn(4, 8)
    y = x.clone()
    y[2, 5] += 10.0
    r = compare("blk", y, x)
    assert not r.passed and r.where == (2, 5) and r.mismatches == 1
    with pytest.raises(AssertionError, match=r"\[FAIL\] blk \[4, 8\] fp32: .*rel L2"):
        assert_parity("blk", x * (1 + 1e-3), x)


def test_nan_never_passes():
    x = torch.randn(8)
    y = x.clone()
    y[3] = float("nan")
    r = compare("nan", y, x, tolerance=TOLERANCES[("fp32", "block")])
    assert not r.passed and "non-finite" in r.reason and r.where == (3,)


def test_fp16_judged_by_budget_against_float64():
    ref = torch.randn(1000, dtype=torch.float64)
    theirs = ref.half()
    good = (ref + 1e-5 * torch.randn_like(ref)).half()  # as accurate as one fp16 rounding
    bad = (ref * (1 + 3e-3)).half()  # a 0.3% scale error: within 1e-2 of diffusers but far less accurate
    assert compare("good", good, theirs, ref).passed
    r = compare("bad", bad, theirs, ref)
    assert not r.passed and "less accurate than diffusers" in r.reason
    assert r.pare_err64 > 2e-3 and r.diffusers_err64 < 5e-4


def test_fp16_without_reference_is_refused():
    x = torch.randn(10).half()
    assert "no float64 reference" in compare("x", x, x).reason


def test_shape_mismatch_raises():
    with pytest.raises(AssertionError, match="shape"):
        compare("x", torch.zeros(2), torch.zeros(3))


def test_tolerance_table_matches_the_documented_policy():
    assert tolerance_for("fp32", "block").rel_l2 == 1e-5
    assert tolerance_for("fp32", "end_to_end").rel_l2 == 1e-4
    for dt in ("fp16", "bf16"):
        assert tolerance_for(dt).budget == 1.25 and tolerance_for(dt).rel_l2 == 1e-2
    with pytest.raises(ValueError, match="unknown tolerance scope"):
        tolerance_for("fp32", "blocks")
