"""The draft builder's budget forecast: it reads the measured curve, and says more for more time."""

from __future__ import annotations

import pytest

from ryzen_opt.optimizers.draft import BUDGET_CURVE, expected_agreement


def test_expected_agreement_passes_through_the_measured_points_and_grows_with_the_budget() -> None:
    for budget, agreement in BUDGET_CURVE:
        assert expected_agreement(budget) == pytest.approx(agreement)
    budgets = [60, 300, 600, 900, 1200, 2400, 3600, 7200, 10**6]
    values = [expected_agreement(b) for b in budgets]
    assert values == sorted(values)
    assert values[0] >= 0.0
    assert values[-1] <= 1.0
    assert BUDGET_CURVE[1][1] < expected_agreement(2400) < BUDGET_CURVE[2][1]
