"""The pytest plugin, registered as the ``ryzen`` pytest11 entry point.

- Options: ``--device`` (``--ryzen-device``; only ``--ryzen-device`` where another plugin owns ``--device``),
  ``--ryzen-report-dir``, ``--ryzen-gate``, ``--ryzen-thresholds``, ``--ryzen-threads``, ``--ryzen-save``,
  ``--ryzen-compare``, ``--ryzen-disable``.
- Under pytest-xdist a test that measures runs alone (:mod:`pytest_ryzen.scheduling`).
- Markers: the threshold gates ``speedup``, ``accuracy_loss``, ``compression_ratio``, ``memory_reduction``,
  ``acceptance_rate``, plus ``perf``, ``gpu`` and ``slow``. Arguments are checked at collection.
- Fixtures: ``device``, ``ryzen`` (measure and record), ``ryzen_heldout`` (held-out text), ``training_metrics``,
  ``ryzen_thresholds``.
- After each test's call, every threshold marker is checked against what the test recorded; a failing gate fails
  the test. At session end the controller writes the JSON reports: ``validation_report``,
  ``integration_test_report``, ``training_metrics_report`` (only when training metrics were recorded) and the final
  report (``final_report``, or the ini ``ryzen_final_report`` name), whose parts are the project's: the ``ryzen_parts``
  ini lines and the ``pytest_ryzen_report_parts`` hook, else the groups (``optimizer=``) its gates named.

The device is resolved once at start-up when ``--device`` is given, so ``pytest -m perf --device=rocm`` on a
machine without ROCm stops with one clear message instead of fifty skips. Importing the plugin never touches CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_ryzen import hookspec, reporting, scheduling
from pytest_ryzen.session import (
    FINAL_REPORT,
    GATES_PROPERTY,
    RECORDS_PROPERTY,
    TRACKED_PROPERTY,
    RyzenSession,
    evaluate_gates,
    iter_gate_failures,
    marker_threshold,
    profile_key,
    threshold_markers,
    tracked_entries,
)
from ryzen_opt.errors import RyzenOptError
from ryzen_opt.training.metrics import TrainingMetricsCollector
from ryzen_opt.validation import baselines
from ryzen_opt.validation.gates import GATE_MODES, METRICS
from ryzen_opt.validation.reports import environment
from ryzen_opt.validation.validator import load_thresholds

if TYPE_CHECKING:
    import torch

    from pytest_ryzen.fixture import RyzenRecorder
    from ryzen_opt.training.metrics import TrainingMetricsCollector

MARKERS: dict[str, str] = {
    **{f"{name}({spec.comparison})": f"gate: {spec.meaning}" for name, spec in METRICS.items()},
    "perf": "a performance test: times code; under xdist it runs alone (no other test runs meanwhile), "
    "selected with -m perf",
    "gpu": "needs a GPU device (--device=cuda or --device=rocm)",
    "slow": "takes more than a few seconds",
}

_DEVICE_KEY = pytest.StashKey["torch.device | None"]()
_SESSION_KEY = pytest.StashKey[RyzenSession]()
_THRESHOLDS_KEY = pytest.StashKey[Any]()
_RECORDER_KEY = pytest.StashKey["RyzenRecorder"]()
_GATES_KEY = pytest.StashKey[list[dict[str, Any]]]()
_BASELINE_KEY = pytest.StashKey["dict[str, Any] | None"]()
_WORKEROUTPUT_TRAINING = "ryzen_training_metrics"


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspec)


_DEVICE_HELP = "device for the ryzen fixtures (default: the ryzen_device ini value, else auto: a GPU if present)"
_DEVICE_OWNER_KEY = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ryzen", "ryzen-opt performance gates")
    # --device itself is added once the initial conftests are loaded, and only if nobody else owns it
    # (pytest_load_initial_conftests below): a project's own --device must not crash pytest at start-up.
    group.addoption(
        "--ryzen-device",
        dest="ryzen_device",
        default=None,
        metavar="{auto,cpu,cuda,rocm,mps}",
        help=_DEVICE_HELP,
    )
    group.addoption(
        "--ryzen-report-dir",
        dest="ryzen_report_dir",
        default=None,
        metavar="DIR",
        help="where the four ryzen JSON reports are written (default: ryzen_results/ under rootdir). Reports are "
        "written when a test used a ryzen fixture or gate, or when this option is given.",
    )
    group.addoption(
        "--ryzen-gate",
        dest="ryzen_gate",
        default=None,
        choices=GATE_MODES,
        help="what a gate's INCONCLUSIVE verdict means: strict (fails, default), lenient (passes with a note), "
        "report (record only; no gate ever fails a test)",
    )
    group.addoption(
        "--ryzen-thresholds",
        dest="ryzen_thresholds",
        default=None,
        metavar="TOML",
        help="thresholds profile with [default] and per-device [cpu]/[cuda]/[rocm]/[mps] sections; markers may "
        "name its keys, e.g. @speedup('kernel_speedup')",
    )
    group.addoption(
        "--ryzen-threads",
        dest="ryzen_threads",
        type=int,
        default=None,
        metavar="N",
        help="torch.set_num_threads(N) for the whole session (recorded with every speedup); default: torch's own",
    )
    group.addoption(
        "--ryzen-save",
        dest="ryzen_save",
        default=None,
        metavar="NAME",
        help="save this session's gate measurements as baseline NAME in .ryzen/NAME.json under the rootdir, with "
        "the machine and the commit",
    )
    group.addoption(
        "--ryzen-compare",
        dest="ryzen_compare",
        default=None,
        metavar="NAME",
        help="compare every gate's measurement with baseline NAME (or 'latest', or a baseline .json path): a test "
        "whose measurement regressed (the 95%% intervals do not overlap, worse side) fails",
    )
    group.addoption(
        "--ryzen-disable",
        dest="ryzen_disable",
        action="store_true",
        default=False,
        help="run perf tests once as functional tests: ryzen.compare runs each arm once, untimed, and speedup "
        "gates are SKIPPED (pytest-benchmark's --benchmark-disable)",
    )
    parser.addini("ryzen_device", "default device for the ryzen fixtures when --device is not given", default="auto")
    parser.addini("ryzen_gate", "default --ryzen-gate mode", default="strict")
    parser.addini("ryzen_thresholds", "default thresholds profile (TOML path)", default="")
    parser.addini(
        "ryzen_parts",
        "groups (the optimizer= of the gates' records) the final report needs measured before it says COMPLETE",
        type="linelist",
        default=[],
    )
    parser.addini("ryzen_final_report", "file name (without .json) of the final report", default=FINAL_REPORT)


def _option_names(parser: pytest.Parser) -> set[str]:
    """Every option string registered so far, by any plugin or conftest (pytest keeps them per group)."""
    groups = [*getattr(parser, "_groups", []), getattr(parser, "_anonymous", None)]
    return {name for group in groups if group is not None for opt in group.options for name in opt.names()}


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> Any:
    """Claim ``--device`` as an alias of ``--ryzen-device`` unless a plugin or conftest already did: then ryzen
    steps back to ``--ryzen-device`` and says so in the header (pytest-playwright, for one, has its own
    ``--device``). Runs after the initial conftests added their options, before the command line is parsed."""
    result = yield
    if "--device" in _option_names(parser):
        early_config.stash[_DEVICE_OWNER_KEY] = "another plugin or conftest"
    else:
        parser.getgroup("ryzen").addoption("--device", dest="ryzen_device", default=None, help=_DEVICE_HELP)
    return result


def pytest_report_header(config: pytest.Config) -> list[str]:
    if config.stash.get(_DEVICE_OWNER_KEY, None):
        return ["ryzen: --device belongs to another plugin or conftest here; choose ryzen's device with --ryzen-device"]
    return []


def pytest_configure(config: pytest.Config) -> None:
    for marker, text in MARKERS.items():
        config.addinivalue_line("markers", f"{marker}: {text}")
    gate = config.getoption("ryzen_gate") or str(config.getini("ryzen_gate"))
    if gate not in GATE_MODES:
        raise pytest.UsageError(f"ryzen: ryzen_gate = {gate!r}; allowed values are {', '.join(GATE_MODES)}")
    config.stash[_SESSION_KEY] = RyzenSession(gate)
    config.pluginmanager.register(_ReportListener(config.stash[_SESSION_KEY]), "ryzen-report-listener")
    config.stash[_DEVICE_KEY] = None
    config.stash[_THRESHOLDS_KEY] = None
    requested = config.getoption("ryzen_device")
    if requested is not None:
        # Resolve eagerly: a wrong --device is a usage error of the whole run, reported once.
        config.stash[_DEVICE_KEY] = _resolve(requested)
    profile = config.getoption("ryzen_thresholds") or str(config.getini("ryzen_thresholds"))
    if profile:
        config.stash[_THRESHOLDS_KEY] = _load_thresholds(config, profile)
    final_report_name(config)  # a bad ini value is a usage error now, not at the end
    _configure_baselines(config)
    if not hasattr(config, "workerinput") and config.getoption("ryzen_report_dir"):
        # Only a directory asked for: a project that never uses ryzen must not fail on a read-only rootdir.
        _check_report_dir(report_dir(config))
    threads = config.getoption("ryzen_threads")
    if threads is not None:
        if threads < 1:
            raise pytest.UsageError(f"ryzen: --ryzen-threads={threads}: at least 1")
        import torch

        torch.set_num_threads(threads)


def _configure_baselines(config: pytest.Config) -> None:
    """Check ``--ryzen-save``'s name and load ``--ryzen-compare``'s baseline now (in every xdist worker too: the
    comparison runs where the test ran), so that a typo stops the run before anything is measured."""
    try:
        if config.getoption("ryzen_save"):
            baselines.check_name(config.getoption("ryzen_save"))
        which = config.getoption("ryzen_compare")
        config.stash[_BASELINE_KEY] = baselines.load(config.rootpath, which) if which else None
    except RyzenOptError as exc:
        raise pytest.UsageError(f"ryzen: {exc}") from exc


def _check_report_dir(out: Path) -> None:
    """A report directory that cannot be written is a usage error now, not a traceback after the whole run."""
    problem = reporting.unwritable(out)
    if problem is not None:
        raise pytest.UsageError(f"ryzen: {problem}; choose another with --ryzen-report-dir")


def _resolve(spec: str) -> torch.device:
    # lazy: imports torch, and the plugin loads without torch
    from ryzen_opt.device import resolve_device

    try:
        return resolve_device(spec)
    except RyzenOptError as exc:
        raise pytest.UsageError(f"ryzen: {exc}") from exc


def _session_device(config: pytest.Config) -> torch.device:
    resolved = config.stash.get(_DEVICE_KEY, None)
    if resolved is None:
        resolved = _resolve(str(config.getini("ryzen_device")))
        config.stash[_DEVICE_KEY] = resolved
    return resolved


def _load_thresholds(config: pytest.Config, profile: str | None = None) -> Any:
    # lazy: imports torch, and the plugin loads without torch
    from ryzen_opt.device import device_class

    cls = device_class(_session_device(config))
    try:
        return load_thresholds(profile or None, device_class=cls)
    except RyzenOptError as exc:
        raise pytest.UsageError(f"ryzen: {exc}") from exc


def _thresholds(config: pytest.Config) -> Any:
    if config.stash.get(_THRESHOLDS_KEY, None) is None:
        config.stash[_THRESHOLDS_KEY] = _load_thresholds(config)
    return config.stash[_THRESHOLDS_KEY]


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Check every threshold marker's arguments now: a wrong one is a usage error, not a failure at the end. Two
    gates of one kind on one test (on the function and its class or module, or stacked) are a usage error too:
    only one would be enforced, and silently picking one hides the other."""
    for item in items:
        kinds = [m.name for m in item.iter_markers() if m.name in METRICS]
        for kind in sorted({k for k in kinds if kinds.count(k) > 1}):
            raise pytest.UsageError(
                f"{item.nodeid}: {kinds.count(kind)} @{kind} gates apply to this test (stacked, or on its class or "
                f"module too); keep one"
            )
        for marker in threshold_markers(item):
            try:
                marker_threshold(marker, _thresholds(config) if profile_key(marker) is not None else None)
            except pytest.UsageError as exc:
                raise pytest.UsageError(f"{item.nodeid}: {exc}") from None


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.gpu`` tests skip unless the session's device is a GPU (CUDA, or ROCm, which torch calls
    ``cuda`` too)."""
    if item.get_closest_marker("gpu") is not None:
        device = _session_device(item.config)
        if device.type != "cuda":
            pytest.skip(f"needs a GPU (--device=cuda or --device=rocm); the session's device is {device}")


# -- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    """The ``torch.device`` chosen with ``--device`` (or the ``ryzen_device`` ini value, default ``auto``)."""
    return _session_device(pytestconfig)


@pytest.fixture(scope="session")
def ryzen_thresholds(pytestconfig: pytest.Config) -> Any:
    """The thresholds profile for this device class (``ryzen_opt.validation.validator.Thresholds``)."""
    return _thresholds(pytestconfig)


@pytest.fixture
def ryzen(request: pytest.FixtureRequest, device: torch.device) -> RyzenRecorder:
    """Measure and record: ``compare``, ``record``, ``record_accuracy``, ``record_compression``, ``record_memory``,
    ``record_acceptance``. The test's threshold markers are checked against these records after it runs."""
    # lazy: imports torch, and the plugin loads without torch
    from pytest_ryzen.fixture import RyzenRecorder

    thresholds = {
        m.name: marker_threshold(m, _thresholds(request.config) if profile_key(m) is not None else None)
        for m in threshold_markers(request.node)
    }
    under_xdist = hasattr(request.config, "workerinput")
    recorder = RyzenRecorder(
        device,
        thresholds,
        lock=under_xdist,
        nodeid=request.node.nodeid,
        disabled=request.config.getoption("ryzen_disable"),
    )
    request.node.stash[_RECORDER_KEY] = recorder
    return recorder


@pytest.fixture(scope="session")
def ryzen_heldout() -> Callable[..., torch.Tensor]:
    """Held-out English prose as token blocks, for an accuracy gate:
    ``ryzen_heldout(tokenizer, blocks=24, block_size=256, split="test")`` (:func:`pytest_ryzen.heldout_blocks`:
    CPython's documentation, PSF licence; choose your defaults on ``split="tune"``, judge on ``"test"``)."""
    # lazy: imports torch, and the plugin loads without torch
    from pytest_ryzen.helpers import heldout_blocks

    return heldout_blocks


@pytest.fixture
def training_metrics(request: pytest.FixtureRequest) -> Iterator[TrainingMetricsCollector]:
    """A ``TrainingMetricsCollector`` for this test; at session end all of them merge into
    ``training_metrics_report.json``."""
    collector = TrainingMetricsCollector(experiment_id=request.node.nodeid)
    yield collector
    session = request.config.stash[_SESSION_KEY]
    session.training.append(collector.to_dict())
    session.used = True


# -- gates ---------------------------------------------------------------------------------------------------------
@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, Any, Any]:
    """Under xdist, a test that measures runs alone: it holds the run's machine lock exclusively over its setup,
    call and teardown, every other test shared (see :mod:`pytest_ryzen.scheduling`)."""
    path = scheduling.lock_path(item.config)
    if path is None:
        return (yield)
    exclusive = scheduling.measures(item, tuple(METRICS))
    with scheduling.hold_machine(path, exclusive=exclusive) as waited:
        if exclusive:
            item.user_properties.append(("ryzen_machine_wait_s", round(waited, 3)))
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    """A gate's failure is the test's failure, raised in the call phase after the body returned, so ``xfail``,
    ``xfail(strict=True)`` and ``--runxfail`` treat it as pytest users expect. A body that raised is judged by its
    exception alone: its gates are not evaluated (they would only add "recorded no measurement")."""
    result = yield
    if not threshold_markers(item):
        return result
    gates = _item_gates(item)
    mode = item.config.stash[_SESSION_KEY].gate_mode
    lines = [f"ryzen gate failed: {g['message']}" for g in iter_gate_failures(gates, mode)]
    baseline = item.config.stash.get(_BASELINE_KEY, None)
    if baseline is not None:
        lines += _compare_with_baseline(gates, baseline, mode)
    if lines:
        pytest.fail("\n".join(lines), pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """The call report carries this test's records, its gates and its ungated (tracked) measurements to the
    controller (xdist forwards ``user_properties``)."""
    report: pytest.TestReport = yield
    if report.when != "call":
        return report
    recorder = item.stash.get(_RECORDER_KEY, None)
    records = recorder.records if recorder is not None else []
    if recorder is not None:
        report.user_properties.append((RECORDS_PROPERTY, records))
        report.user_properties.append((TRACKED_PROPERTY, tracked_entries(item, records)))
    gates = item.stash.get(_GATES_KEY, None)
    if gates is not None:
        report.user_properties.append((GATES_PROPERTY, gates))
    return report


def _compare_with_baseline(gates: list[dict[str, Any]], baseline: dict[str, Any], mode: str) -> list[str]:
    """Attach each gate's comparison with the stored measurement (``gate["baseline_compare"]``); the failure lines
    of those that regressed (none under ``--ryzen-gate=report``, which records only)."""
    measured = [g for g in gates if g.get("actual") is not None]
    comparisons = baselines.compare(baseline["entries"], [baselines.entry_from_gate(g) for g in measured], gone=False)
    lines = []
    for gate, comparison in zip(measured, comparisons, strict=True):
        gate["baseline_compare"] = comparison.to_dict() | {"baseline": baseline["name"]}
        if comparison.verdict == baselines.REGRESSED and mode != "report":
            lines.append(f"ryzen baseline regression: {comparison.message(baseline['name'])}")
    return lines


def _item_gates(item: pytest.Item) -> list[dict[str, Any]]:
    """The verdicts of ``item``'s threshold markers on what it recorded, evaluated once (the gate hook and
    pytest-json-report's metadata hook both ask)."""
    gates = item.stash.get(_GATES_KEY, None)
    if gates is None:
        markers = threshold_markers(item)
        recorder = item.stash.get(_RECORDER_KEY, None)
        records = recorder.records if recorder is not None else []
        device = str(recorder.device) if recorder is not None else None
        thresholds = _thresholds(item.config) if any(profile_key(m) is not None for m in markers) else None
        disabled = item.config.getoption("ryzen_disable")
        gates = item.stash[_GATES_KEY] = evaluate_gates(item, records, thresholds, device, disabled=disabled)
    return gates


class _ReportListener:
    """Feeds every test report to the session object. Registered per config; on the xdist controller it also
    receives the workers' reports, which xdist replays through ``pytest_runtest_logreport``."""

    def __init__(self, session: RyzenSession) -> None:
        self.session = session

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.session.add_report(report)


@pytest.hookimpl(optionalhook=True)
def pytest_json_runtest_metadata(item: pytest.Item, call: pytest.CallInfo[None]) -> dict[str, Any]:
    """pytest-json-report: this test's records and its gates' verdicts (status, measured value, threshold, CI,
    message) go into its ``metadata["ryzen"]``."""
    if call.when != "call":
        return {}
    recorder = item.stash.get(_RECORDER_KEY, None)
    records = recorder.records if recorder is not None else []
    gates = item.stash.get(_GATES_KEY, None) or []  # evaluated in the call phase, when the body returned
    if not records and not gates:
        return {}
    keep = ("metric", "status", "actual", "expected", "comparison", "ci_low", "ci_high", "n", "message")
    verdicts = [{k: g.get(k) for k in (*keep, "optimizer", "threshold_key") if k in g} for g in gates]
    return {"ryzen": {"records": records, "gates": verdicts}}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist controller: collect the training metrics a finished worker gathered."""
    payload = getattr(node, "workeroutput", {}).get(_WORKEROUTPUT_TRAINING)
    session = node.config.stash[_SESSION_KEY]
    if payload:
        session.training.extend(payload)
        session.used = True


# -- reports -------------------------------------------------------------------------------------------------------
def report_dir(config: pytest.Config) -> Path:
    """``--ryzen-report-dir``, or ``ryzen_results/`` under the rootdir."""
    chosen = config.getoption("ryzen_report_dir")
    return Path(chosen) if chosen else Path(config.rootpath) / "ryzen_results"


@pytest.hookimpl(trylast=True)
def pytest_ryzen_generate_report(config: pytest.Config, name: str, data: dict[str, Any]) -> dict[str, Any]:
    return data


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    ryzen = config.stash[_SESSION_KEY]
    if hasattr(config, "workerinput"):
        config.workeroutput[_WORKEROUTPUT_TRAINING] = ryzen.training  # type: ignore[attr-defined]
        return
    if not (ryzen.used or config.getoption("ryzen_report_dir") or config.getoption("ryzen_save")):
        return
    if exitstatus == pytest.ExitCode.USAGE_ERROR:
        return

    env = environment(_session_device(config))
    out = report_dir(config)
    problem = reporting.unwritable(out)
    if problem is not None:
        ryzen.write_error = f"ryzen: reports not written: {problem}; choose another with --ryzen-report-dir"
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        return
    built = ryzen.build_reports(env, _used_thresholds(config, ryzen), report_parts(config), final_report_name(config))
    reports = {}
    for name, data in built.items():
        report = config.hook.pytest_ryzen_generate_report(config=config, name=name, data=data)
        config.hook.pytest_ryzen_modify_report(config=config, name=name, report=report)
        reports[name] = report
    ryzen.history = reporting.write_reports(out, reports)
    ryzen.written = out
    save = config.getoption("ryzen_save")
    if save:
        ryzen.saved = baselines.save(config.rootpath, save, [*ryzen.gates(), *ryzen.tracked()], env)


def report_parts(config: pytest.Config) -> list[str]:
    """The parts the final report needs: the ``ryzen_parts`` ini lines, then every ``pytest_ryzen_report_parts``
    hook's, in order, once each."""
    parts = [str(p) for p in config.getini("ryzen_parts")]
    for declared in config.hook.pytest_ryzen_report_parts(config=config):
        parts.extend(declared or [])
    return list(dict.fromkeys(parts))


def final_report_name(config: pytest.Config) -> str:
    name = str(config.getini("ryzen_final_report")).strip()
    if not name or "/" in name or "\\" in name or name.endswith(".json"):
        raise pytest.UsageError(
            f"ryzen: ryzen_final_report = {name!r}: a file name without directory or .json, e.g. final_report"
        )
    return name


def _used_thresholds(config: pytest.Config, ryzen: RyzenSession) -> Any | None:
    """The thresholds profile when the session used one: given (``--ryzen-thresholds``, ini) or named by a gate."""
    given = config.getoption("ryzen_thresholds") or str(config.getini("ryzen_thresholds"))
    if given or any(g.get("threshold_key") for g in ryzen.gates()):
        return _thresholds(config)
    return None


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    ryzen = config.stash.get(_SESSION_KEY, None)
    if ryzen is None or hasattr(config, "workerinput"):
        return
    gates = ryzen.gates()
    if gates:
        terminalreporter.section("ryzen gates")
        for gate in gates:
            accepted = " [xfail: accepted]" if gate.get("xfail") else ""
            terminalreporter.write_line(f"{gate['status']:<12} {gate['name']}: {gate['message']}{accepted}")
        for line in reporting.arm_table([*gates, *ryzen.tracked()]):
            terminalreporter.write_line(line)
        # What a gentler mode let pass is said, not hidden: each gate strict would have failed.
        let_through = iter_gate_failures(gates, "strict") if ryzen.gate_mode != "strict" else []
        if let_through:
            terminalreporter.write_line(
                f"ryzen: --ryzen-gate={ryzen.gate_mode} let {len(let_through)} gate(s) through that strict fails:",
                yellow=True,
            )
            for gate in let_through:
                nothing = " (the test recorded nothing)" if gate.get("actual") is None else ""
                terminalreporter.write_line(f"  {gate['status']} {gate['name']}: {gate['metric']}{nothing}")
    baseline = config.stash.get(_BASELINE_KEY, None)
    if baseline is not None:
        _summarize_baseline(terminalreporter, config, gates, baseline)
    tracked = ryzen.tracked()
    if tracked:
        terminalreporter.section("ryzen tracked (measured, no gate)")
        for entry in tracked:
            terminalreporter.write_line(f"TRACKED      {entry['name']}: {entry['metric']} = {entry['actual']}")
    if ryzen.write_error is not None:
        terminalreporter.write_line(ryzen.write_error, red=True)
    if ryzen.written is not None:
        terminalreporter.write_line(f"ryzen reports written to {ryzen.written}/")
        if ryzen.history is not None:
            terminalreporter.write_line(f"ryzen history: this run's copy in {ryzen.history}/")
    if ryzen.saved is not None:
        terminalreporter.write_line(f"ryzen baseline saved to {ryzen.saved}")


def _summarize_baseline(
    terminalreporter: Any, config: pytest.Config, gates: list[dict[str, Any]], baseline: Any
) -> None:
    """The comparison table against the baseline, with what differs about the machine it was saved on."""
    compared = [g["baseline_compare"] for g in gates if g.get("baseline_compare")]
    terminalreporter.section(f"ryzen baseline {baseline['name']!r}")
    saved = f"saved {baseline.get('saved_at')} at commit {(baseline.get('commit') or 'unknown')[:12]}"
    terminalreporter.write_line(f"{saved}; regressed = the new 95% interval entirely on the worse side of the stored")
    mismatch = baselines.machine_mismatch(
        baseline.get("machine") or {}, baselines.machine_facts(environment(_session_device(config)))
    )
    if mismatch:
        terminalreporter.write_line(f"machine differs from the baseline's: {'; '.join(mismatch)}", yellow=True)
    comparisons = [
        baselines.Comparison(c["test"], c["metric"], c["verdict"], c["old"], c["new"], c["how"]) for c in compared
    ]
    header, rows = baselines.table(comparisons)
    all_rows = [header, *rows]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]
    for row in all_rows:
        terminalreporter.write_line("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
