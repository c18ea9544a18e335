"""Run control as pure rules: batch sizes, the failure budget's arithmetic, where a setting comes
from (the run's own fields over a job's payload.fleet), and the errors that say what to write."""

from __future__ import annotations

from fractions import Fraction

import pytest

from cronium_fab.control import BatchPlan, Budget, Limit, RunControl, Size
from cronium_fab.errors import ConfigError
from cronium_fab.output import Progress, output_file_stems


@pytest.mark.parametrize(("spec", "total", "want"), [
    ("1,10%,100%", 12, [1, 2, 9]),      # a canary, 10% (1.2 rounded up), then the rest
    ("1,10%,100%", 1, [1]),
    ("1,10%,100%", 3, [1, 1, 1]),       # 10% of 3 is 0.3: at least one host
    ("5", 12, [5, 5, 2]),               # one size repeats
    ("1, 25%", 12, [1, 3, 3, 3, 2]),    # the last size repeats
    ("100%", 12, [12]),
    ("50", 12, [12]),
    ("2.5%", 100, [3] * 33 + [1]),
    ("3", 0, []),
])
def test_batch_sizes(spec: str, total: int, want: list[int]) -> None:
    assert BatchPlan.parse(spec).split(total) == want
    assert sum(want) == total


def test_batches_are_index_ranges_in_host_order() -> None:
    control = RunControl.from_fields({"batch": [1, "10%", "100%"]})
    assert control.batches(12) == [range(0, 1), range(1, 3), range(3, 12)]
    assert RunControl().batches(4) == [range(0, 4)] and RunControl().batches(0) == []


@pytest.mark.parametrize("bad", ["0", "1,,2", "x", "150%", "0%", "-1", "1.5", "", "%", "1,0"])
def test_bad_batch_sizes_say_what_to_write(bad: str) -> None:
    with pytest.raises(ConfigError, match="--batch .*needs a whole number of hosts .*percentage"):
        BatchPlan.parse(bad)


@pytest.mark.parametrize(("limit", "total", "allowed", "exceeded"), [
    ("0", 12, 0, 1),          # --fail-fast: the first failure stops
    ("2", 12, 2, 3),          # more than 2
    ("10%", 12, 1, 2),        # 10% of 12 is 1.2: 1 is within, 2 is more
    ("25%", 12, 3, 4),        # exactly 25% is within
    ("100%", 12, 12, 13),
    ("0%", 12, 0, 1),
    ("12.5%", 8, 1, 2),
])
def test_limit_is_exceeded_by_more_than_it_allows(limit: str, total: int, allowed: int, exceeded: int) -> None:
    lim = Limit.parse(limit, "--max-failures")
    assert not lim.exceeded(allowed, total)
    assert lim.exceeded(exceeded, total)


def test_size_keeps_percentages_exact() -> None:
    assert Size.parse("12.5%", "x", minimum=0).percent == Fraction(25, 2)
    assert Size.parse("12.5%", "x", minimum=0).to_json() == "12.5%"
    assert Size.parse(" 7 ", "x", minimum=1).to_json() == 7


def test_budget_counts_failures_and_unreachable_apart_over_the_whole_run() -> None:
    control = RunControl.from_fields({"max_failures": "1", "max_unreachable": "2"})
    budget = Budget(control, 12)
    assert budget.record("success") is None and budget.record("unreachable") is None
    assert budget.record("unreachable") is None                 # 2 unreachable: within --max-unreachable 2
    assert budget.record("failure") is None                     # 1 failure: within --max-failures 1
    assert budget.record("cancelled") is None and budget.record("skipped") is None   # neither counts
    assert budget.record("timeout") == "2 hosts failed, more than --max-failures 1 allows"
    assert budget.stopped == "2 hosts failed, more than --max-failures 1 allows"
    assert budget.record("unreachable") is None                 # said once; the first reason stays
    assert (budget.failed, budget.unreachable) == (2, 3)


def test_budget_reasons_name_the_limit() -> None:
    unreachable = Budget(RunControl.from_fields({"max_unreachable": "0"}), 5)
    assert unreachable.record("unreachable") == "1 host was unreachable, more than --max-unreachable 0 allows"
    share = Budget(RunControl.from_fields({"max_failures": "10%"}), 12)
    share.record("failure")
    assert share.record("failure") == "2 of 12 hosts failed, more than --max-failures 10% allows"
    fast = Budget(RunControl.from_fields({"fail_fast": True}), 3)
    assert fast.record("failure") == "1 host failed, more than --fail-fast (--max-failures 0) allows"
    assert Budget(RunControl(), 3).record("failure") is None    # no budget: never stops


def test_the_runs_own_fields_win_over_the_jobs_payload() -> None:
    job = {"batch": "1,100%", "maxFailures": "10%", "maxUnreachable": 3, "connectRetries": 4, "outputDir": "/tmp/x"}
    from_job = RunControl.from_fields({}, job_fleet=job, job_id="job_1")
    assert from_job.to_payload() == {"batch": [1, "100%"], "maxFailures": "10%", "maxUnreachable": 3,
                                     "connectRetries": 4, "outputDir": "/tmp/x"}
    mine = RunControl.from_fields({"batch": "2", "fail_fast": True, "connect_retries": 0}, job_fleet=job, job_id="j")
    assert mine.to_payload() == {"batch": [2], "maxFailures": 0, "maxUnreachable": 3, "connectRetries": 0,
                                 "outputDir": "/tmp/x"}
    assert RunControl.from_fields({"max_failures": 3}, job_fleet={"failFast": True}).max_failures == \
        Limit.parse(3, "--max-failures")
    assert RunControl().to_payload() == {} and RunControl().connect_retries == 1


@pytest.mark.parametrize(("fields", "job", "message"), [
    ({"fail_fast": True, "max_failures": "2"}, None, "--fail-fast means a max-failures of 0 and cannot go with "
                                                      "--max-failures '2'"),
    ({"max_failures": "lots"}, None, r"--max-failures needs a whole number of hosts \(0 or more\)"),
    ({"max_unreachable": "101%"}, None, "--max-unreachable needs .* up to 100%"),
    ({"connect_retries": 11}, None, "--connect-retries needs a whole number from 0 to 10"),
    ({"connect_retries": "-1"}, None, "--connect-retries needs a whole number from 0 to 10"),
    ({"output_dir": " "}, None, "--output-dir needs a directory path"),
    ({}, {"maxFailures": "x"}, "job job_1: payload.fleet.maxFailures needs a whole number"),
    ({}, {"failFast": "yes"}, "job job_1: payload.fleet.failFast must be true or false"),
    ({}, {"batchSize": 3}, r"job job_1: payload.fleet has unknown keys \['batchSize'\]"),
    ({}, [1], "job job_1: payload.fleet must be an object"),
])
def test_bad_control_values_say_what_to_do(fields: dict[str, object], job: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunControl.from_fields(fields, job_fleet=job, job_id="job_1")  # type: ignore[arg-type]


def test_run_request_refuses_bad_values_when_it_is_made() -> None:
    from cronium_fab.execute import RunRequest

    with pytest.raises(ConfigError, match="--batch"):
        RunRequest(event_id=1, batch="0")
    with pytest.raises(ConfigError, match="--only must be one of all, failed, unreachable"):
        RunRequest(event_id=1, rerun_only="everything")  # type: ignore[arg-type]


def test_output_file_names_are_safe_and_distinct() -> None:
    assert output_file_stems(["web1", "web1", "../etc/passwd", ".hidden", "deploy@10.0.0.5:22", "a b", ""]) == [
        "web1", "web1-2", "_etc_passwd", "hidden", "deploy@10.0.0.5:22", "a_b", "host"]


def test_progress_line_counts_done_running_failed_left() -> None:
    p = Progress(5)
    for _ in range(3):
        p.started()
    p.finished("success", was_running=True)
    p.finished("unreachable", was_running=True)
    assert p.line().startswith("done 1/5 · running 1 · failed 1 · left 2 · ")
    p.finished("skipped", was_running=False)
    assert p.line().startswith("done 1/5 · running 1 · failed 1 · left 1 · skipped 1 · ")
