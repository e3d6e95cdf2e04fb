"""The baseline comparison rule: intervals decide, a run never regresses against itself, and the verdict is
symmetric (what regressed from A to B improved from B to A)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ryzen_opt.errors import ConfigError
from ryzen_opt.validation import baselines


def _entry(value: float, half: float | None, comparison: str = "min", metric: str = "speedup") -> dict:
    ci = {} if half is None else {"ci_low": value - half, "ci_high": value + half}
    return {"test": "t.py::test_x", "metric": metric, "value": value, "comparison": comparison, **ci}


values = st.floats(min_value=0.01, max_value=100, allow_nan=False)
halves = st.floats(min_value=0.0, max_value=5, allow_nan=False)


@given(values, halves, st.sampled_from(["min", "max"]))
def test_a_measurement_never_regresses_against_itself(value: float, half: float, comparison: str) -> None:
    entry = _entry(value, half, comparison)
    assert baselines.compare_entry(entry, entry).verdict == baselines.SAME


@given(values, halves, values, halves, st.sampled_from(["min", "max"]))
def test_the_verdict_is_symmetric(v1: float, h1: float, v2: float, h2: float, comparison: str) -> None:
    a, b = _entry(v1, h1, comparison), _entry(v2, h2, comparison)
    forward, backward = baselines.compare_entry(a, b).verdict, baselines.compare_entry(b, a).verdict
    flip = {baselines.REGRESSED: baselines.IMPROVED, baselines.IMPROVED: baselines.REGRESSED}
    assert backward == flip.get(forward, forward)


def test_intervals_decide_and_direction_follows_the_metric() -> None:
    fast, slow = _entry(3.0, 0.2), _entry(1.0, 0.1)
    assert baselines.compare_entry(fast, slow).verdict == baselines.REGRESSED
    assert baselines.compare_entry(fast, _entry(2.7, 0.2)).verdict == baselines.SAME  # the intervals overlap
    # accuracy loss: lower is better
    assert baselines.compare_entry(_entry(0.001, 0.002, "max"), _entry(0.02, 0.003, "max")).verdict == "REGRESSED"
    # without intervals, a change within 1% is the same
    assert baselines.compare_entry(_entry(4.0, None), _entry(3.97, None)).verdict == baselines.SAME
    assert baselines.compare_entry(_entry(4.0, None), _entry(3.0, None)).verdict == baselines.REGRESSED


def test_pairing_by_test_and_metric() -> None:
    stored = [_entry(3.0, 0.1), {**_entry(4.0, None, metric="compression_ratio")}]
    current = [_entry(3.0, 0.1), {**_entry(1.0, None), "test": "t.py::test_new"}]
    verdicts = [(c.test, c.metric, c.verdict) for c in baselines.compare(stored, current)]
    assert verdicts == [
        ("t.py::test_x", "speedup", "SAME"),
        ("t.py::test_new", "speedup", "NEW"),
        ("t.py::test_x", "compression_ratio", "GONE"),
    ]


@pytest.mark.parametrize("name", ["latest", "../x", "a/b", "x.json", ""])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="baseline name"):
        baselines.check_name(name)


def test_save_load_latest(tmp_path) -> None:
    env = {"device": "cpu", "device_name": "AMD EPYC", "git_sha": "abc", "versions": {"torch": "2.13.0"}}
    gate = {"name": "t.py::test_x", "metric": "speedup", "actual": 3.0, "ci_low": 2.9, "ci_high": 3.1, "status": "PASS"}
    baselines.save(tmp_path, "v1", [gate], env)
    baselines.save(tmp_path, "v2", [gate | {"actual": 2.0}], env)
    assert baselines.available(tmp_path) == ["v1", "v2"]  # the same second: the file times decide
    assert baselines.load(tmp_path, "v1")["entries"][0]["value"] == 3.0
    assert baselines.load(tmp_path, "latest")["name"] == "v2"
    with pytest.raises(ConfigError, match="saved: "):
        baselines.load(tmp_path, "v3")
    (tmp_path / ".ryzen" / "junk.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a ryzen baseline"):
        baselines.load(tmp_path, "junk")
