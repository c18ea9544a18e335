"""When the worker restarts into new code on disk (pure logic; the restart itself is tested end to
end in tests/run/test_worker.py)."""

from __future__ import annotations

from cronium_fab.worker import CodeWatch


def looks(watch: CodeWatch, seen: list[str | None], imports_ok: bool = True) -> list[str]:
    return [watch.look(fp, lambda: imports_ok) for fp in seen]


def test_unchanged_code_never_restarts() -> None:
    assert looks(CodeWatch("A"), ["A", "A", "A"]) == ["same", "same", "same"]


def test_new_code_restarts_once_stable_for_two_looks() -> None:
    assert looks(CodeWatch("A"), ["B", "B"]) == ["wait", "restart"]


def test_code_still_changing_waits() -> None:
    # an upgrade half-way: every look differs, or a file vanished (None)
    assert looks(CodeWatch("A"), ["B", "C", None, "D", None, "E", "F"]) == ["wait"] * 7


def test_back_to_the_loaded_code_is_no_change() -> None:
    assert looks(CodeWatch("A"), ["B", "A", "A"]) == ["wait", "same", "same"]


def test_code_that_does_not_import_is_not_retried_until_it_changes() -> None:
    watch = CodeWatch("A")
    assert looks(watch, ["B", "B"], imports_ok=False) == ["wait", "unusable"]
    assert looks(watch, ["B", "B", "B"], imports_ok=False) == ["same", "same", "same"]
    assert looks(watch, ["C", "C"]) == ["wait", "restart"]
