"""Run control over a fleet, as pure rules (no I/O): batch sizes, the failure budget, connect retries.

- ``--batch 1,10%,100%``: hosts start in successive batches, each after the previous one ended.
  A size is a count or a share of the run's hosts (rounded up, at least 1); the last size repeats
  until every host has its batch (Ansible's ``serial``), so ``--batch 5`` is batches of 5.
- ``--max-failures N|P%`` and ``--max-unreachable N|P%``: limits over the whole run (never per
  batch). A limit is exceeded when MORE than N hosts (or more than P% of the run's hosts) are in
  its class: script failures (``failure``, ``timeout``) or unreachable hosts, counted apart.
  ``--fail-fast`` is ``--max-failures 0``. Once a limit is exceeded no new host starts.
- ``--connect-retries N``: transient connect failures are tried again N times (default 1).

The same fields come from a Cronium job's ``payload.fleet`` (``batch``, ``maxFailures``,
``failFast``, ``maxUnreachable``, ``connectRetries``, ``outputDir``); a field given to the run
itself (a flag, a ``RunRequest`` field) wins over the job's.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from .errors import ConfigError
from .results import HostStatus

DEFAULT_CONNECT_RETRIES = 1
MAX_CONNECT_RETRIES = 10
FAILED_STATES: frozenset[HostStatus] = frozenset({"failure", "timeout"})   # what --max-failures counts
UNREACHABLE_STATES: frozenset[HostStatus] = frozenset({"unreachable"})     # what --max-unreachable counts

# `rerun --only`: which hosts of a past run run again (``all``: every host that did not succeed)
RerunOnly = Literal["all", "failed", "unreachable"]
RERUN_STATES: dict[str, frozenset[str]] = {
    "all": frozenset({"failure", "timeout", "unreachable", "cancelled", "skipped"}),
    "failed": frozenset(FAILED_STATES),
    "unreachable": frozenset(UNREACHABLE_STATES),
}

# RunRequest field -> the key of a job's payload.fleet
PAYLOAD_KEYS = {"batch": "batch", "max_failures": "maxFailures", "fail_fast": "failFast",
                "max_unreachable": "maxUnreachable", "connect_retries": "connectRetries", "output_dir": "outputDir"}

SizeValue = int | str


@dataclass(frozen=True)
class Size:
    """A number of hosts (``3``) or a share of the run's hosts (``10%``)."""

    count: int | None = None
    percent: Fraction | None = None

    @classmethod
    def parse(cls, value: object, what: str, *, minimum: int) -> Size:
        """``minimum`` 1 for a batch size, 0 for a limit. Raises ConfigError saying what to write."""
        want = ("a whole number of hosts (at least 1) or a percentage of the hosts like 10%" if minimum
                else "a whole number of hosts (0 or more) or a percentage of the hosts like 10%")
        text = str(value).strip() if isinstance(value, int | str) and not isinstance(value, bool) else None
        if text and text.endswith("%"):
            try:
                pct = Fraction(text[:-1].strip())
            except (ValueError, ZeroDivisionError):
                pct = Fraction(-1)
            if not (0 < pct <= 100 if minimum else 0 <= pct <= 100):
                raise ConfigError(f"{what} needs {want}; a percentage must be "
                                  f"{'over 0' if minimum else 'from 0'} up to 100%, got {value!r}")
            return cls(percent=pct)
        if text is None or not text.isdigit() or int(text) < minimum:
            raise ConfigError(f"{what} needs {want}, got {value!r}")
        return cls(count=int(text))

    def of(self, total: int) -> int:
        """How many hosts this size is in a run of ``total`` hosts (a share is rounded up)."""
        if self.count is not None:
            return self.count
        assert self.percent is not None
        return math.ceil(self.percent * total / 100)

    def to_json(self) -> SizeValue:
        if self.count is not None:
            return self.count
        assert self.percent is not None
        p = self.percent
        return f"{p.numerator if p.denominator == 1 else float(p):g}%"

    def __str__(self) -> str:
        return str(self.to_json())


@dataclass(frozen=True)
class BatchPlan:
    """``--batch``: the sizes of the successive batches (the last one repeats)."""

    sizes: tuple[Size, ...]

    @classmethod
    def parse(cls, value: str | Sequence[SizeValue], what: str = "--batch") -> BatchPlan:
        items: list[object] = list(value.split(",")) if isinstance(value, str) else list(value)
        if not items:
            raise ConfigError(f"{what} needs one batch size or a comma-separated list, like 1,10%,100%")
        return cls(tuple(Size.parse(v, f"{what} (each batch size)", minimum=1) for v in items))

    def split(self, total: int) -> list[int]:
        """The length of each batch for ``total`` hosts, in order (they add up to ``total``)."""
        lengths: list[int] = []
        left = total
        while left > 0:
            size = self.sizes[min(len(lengths), len(self.sizes) - 1)]
            n = max(1, min(size.of(total), left))
            lengths.append(n)
            left -= n
        return lengths

    def to_json(self) -> list[SizeValue]:
        return [s.to_json() for s in self.sizes]

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.sizes)


@dataclass(frozen=True)
class Limit:
    """A failure budget: ``flag`` names it in messages (``--max-failures``)."""

    size: Size
    flag: str

    @classmethod
    def parse(cls, value: SizeValue, flag: str, what: str | None = None) -> Limit:
        return cls(Size.parse(value, what or flag, minimum=0), flag)

    def exceeded(self, count: int, total: int) -> bool:
        """More than N hosts, or more than P% of the run's ``total`` hosts (exact: no rounding)."""
        if self.size.count is not None:
            return count > self.size.count
        assert self.size.percent is not None
        return count * 100 > self.size.percent * total

    def __str__(self) -> str:
        return "--fail-fast (--max-failures 0)" if self.flag == "--fail-fast" else f"{self.flag} {self.size}"


@dataclass(frozen=True)
class RunControl:
    """How a run proceeds over its hosts (the defaults: one batch, no budget, one connect retry)."""

    batch: BatchPlan | None = None
    max_failures: Limit | None = None
    max_unreachable: Limit | None = None
    connect_retries: int = DEFAULT_CONNECT_RETRIES
    output_dir: str | None = None

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], *, job_fleet: Mapping[str, Any] | None = None,
                    job_id: str | None = None) -> RunControl:
        """From a run's own fields (``RunRequest``'s names; ``None`` / ``False``: not given) over a
        job's ``payload.fleet`` (its camelCase keys). Raises ConfigError naming the bad value."""
        if job_fleet is not None and not isinstance(job_fleet, Mapping):
            raise ConfigError(f"job {job_id}: payload.fleet must be an object with "
                              f"{', '.join(PAYLOAD_KEYS.values())}, got {job_fleet!r}")
        job = dict(job_fleet or {})
        unknown = sorted(set(job) - set(PAYLOAD_KEYS.values()))
        if unknown:
            raise ConfigError(f"job {job_id}: payload.fleet has unknown keys {unknown}; "
                              f"known: {', '.join(PAYLOAD_KEYS.values())}")

        def pick(name: str, *, group: tuple[str, ...] = ()) -> tuple[Any, str]:
            """The run's value if it gave this field (or one of its group), else the job's."""
            names = group or (name,)
            if any(fields.get(n) is not None and fields.get(n) is not False for n in names):  # 0 is given
                return fields.get(name), "--" + name.replace("_", "-")
            key = PAYLOAD_KEYS[name]
            return job.get(key), f"job {job_id}: payload.fleet.{key}"

        batch_value, batch_what = pick("batch")
        budget = ("max_failures", "fail_fast")
        max_failures, mf_what = pick("max_failures", group=budget)
        fail_fast, ff_what = pick("fail_fast", group=budget)
        if fail_fast not in (None, False, True):
            raise ConfigError(f"{ff_what} must be true or false, got {fail_fast!r}")
        if fail_fast and max_failures is not None and str(max_failures).strip() != "0":
            raise ConfigError(f"{ff_what} means a max-failures of 0 and cannot go with {mf_what} {max_failures!r}: "
                              "give one of them")
        unreachable, mu_what = pick("max_unreachable")
        retries, r_what = pick("connect_retries")
        output_dir, od_what = pick("output_dir")
        if retries is None:
            retries = DEFAULT_CONNECT_RETRIES
        text = str(retries).strip() if isinstance(retries, int | str) and not isinstance(retries, bool) else ""
        if not text.isdigit() or int(text) > MAX_CONNECT_RETRIES:
            raise ConfigError(f"{r_what} needs a whole number from 0 to {MAX_CONNECT_RETRIES} "
                              f"(how often a refused, reset or timed-out connect is tried again), got {retries!r}")
        if output_dir is not None and not (isinstance(output_dir, str | os.PathLike) and str(output_dir).strip()):
            raise ConfigError(f"{od_what} needs a directory path, got {output_dir!r}")
        return cls(
            batch=BatchPlan.parse(batch_value, batch_what) if batch_value not in (None, "") else None,
            max_failures=(Limit.parse(0, "--fail-fast") if fail_fast and max_failures is None
                          else Limit.parse(max_failures, "--max-failures", mf_what) if max_failures is not None
                          else None),
            max_unreachable=Limit.parse(unreachable, "--max-unreachable", mu_what) if unreachable is not None else None,
            connect_retries=int(text),
            output_dir=str(output_dir) if output_dir is not None else None,
        )

    def batches(self, total: int) -> list[range]:
        """Host indexes of each batch, in the run's host order."""
        lengths = self.batch.split(total) if self.batch else ([total] if total else [])
        out, start = [], 0
        for n in lengths:
            out.append(range(start, start + n))
            start += n
        return out

    def to_payload(self) -> dict[str, Any]:
        """``jobs.payload.fleet`` of a run we record: only what differs from the defaults."""
        d: dict[str, Any] = {}
        if self.batch:
            d["batch"] = self.batch.to_json()
        if self.max_failures:
            d["maxFailures"] = self.max_failures.size.to_json()
        if self.max_unreachable:
            d["maxUnreachable"] = self.max_unreachable.size.to_json()
        if self.connect_retries != DEFAULT_CONNECT_RETRIES:
            d["connectRetries"] = self.connect_retries
        if self.output_dir:
            d["outputDir"] = self.output_dir
        return d


class Budget:
    """Counts, over the whole run, the hosts that failed their script and those that were
    unreachable, and says (once) when a limit is exceeded. Thread-safe: hosts end in workers."""

    def __init__(self, control: RunControl, total: int) -> None:
        self.control = control
        self.total = total
        self.failed = 0
        self.unreachable = 0
        self.stopped: str | None = None   # why no new host starts (None: they do)
        self._lock = threading.Lock()

    def record(self, status: HostStatus) -> str | None:
        """One host ended in ``status``; returns the reason when this host exceeded a limit first."""
        with self._lock:
            if status in FAILED_STATES:
                self.failed += 1
            elif status in UNREACHABLE_STATES:
                self.unreachable += 1
            else:
                return None
            if self.stopped is not None:
                return None
            c = self.control
            if c.max_failures and c.max_failures.exceeded(self.failed, self.total):
                self.stopped = self._reason(self.failed, "failed", c.max_failures)
            elif c.max_unreachable and c.max_unreachable.exceeded(self.unreachable, self.total):
                self.stopped = self._reason(self.unreachable, "unreachable", c.max_unreachable)
            return self.stopped

    def _reason(self, count: int, what: str, limit: Limit) -> str:
        share = f" of {self.total}" if limit.size.percent is not None else ""
        hosts = "host" if count == 1 and not share else "hosts"
        verb = "" if what == "failed" else ("was " if hosts == "host" else "were ")
        return f"{count}{share} {hosts} {verb}{what}, more than {limit} allows"
