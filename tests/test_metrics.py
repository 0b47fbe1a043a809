"""gain / forgetting / retention: one pure function, checked on hand-made task tables."""

import math

import pytest

from ftlab.eval.metrics import improvement, summarize, task_entry


def _t(role, base, tuned, hib=True, unit="points"):
    return task_entry(role, "exact_match" if unit == "points" else "perplexity", hib, unit, base, tuned, 10)


def test_gain_and_forgetting_signs():
    s = summarize({"tgt": _t("target", 10.0, 90.0), "a": _t("forget", 100.0, 80.0), "b": _t("forget", 50.0, 60.0)})
    assert s["gain"] == pytest.approx(80.0)
    assert s["forgetting"] == pytest.approx((20.0 - 10.0) / 2)  # b improved: negative forgetting
    assert s["forgetting_max"] == pytest.approx(20.0)
    assert s["retention"] == pytest.approx((80.0 + 120.0) / 2)


def test_lower_is_better_metrics_and_perplexity_stay_out_of_point_means():
    s = summarize({"tgt": _t("target", 5.0, 3.0, hib=False), "acc": _t("forget", 90.0, 90.0),
                   "ppl": _t("forget", 2.0, 3.0, hib=False, unit="ppl")})
    assert s["gain"] == pytest.approx(2.0)  # error rate fell by 2: a gain
    assert s["forgetting"] == pytest.approx(0.0)
    assert s["forget_ppl_change_pct"] == pytest.approx(50.0)
    assert s["n_forget"] == 2


def test_empty_roles_give_none():
    s = summarize({"tgt": _t("target", 0.0, 50.0)})
    assert s["forgetting"] is None and s["forgetting_max"] is None and s["retention"] is None


def test_retention_skips_zero_base():
    s = summarize({"a": _t("forget", 0.0, 10.0), "b": _t("forget", 50.0, 25.0)})
    assert s["retention"] == pytest.approx(50.0)


def test_improvement_direction():
    assert improvement(1.0, 2.0, True) == 1.0 and improvement(1.0, 2.0, False) == -1.0
    assert not math.isnan(task_entry("target", "m", True, "points", 1.0, 3.0, 1)["delta"])
