"""The test report's fault table (docs/test-report.md): rows ordered by case, long test names cut with their parameters kept."""

from __future__ import annotations

import suite_report


def test_rows_are_ordered_by_case_and_keep_their_parameters() -> None:
    long = "test_" + "x" * 80
    rows = [
        {"case": "network", "what": "b", "result": "r", "figures": "", "test": f"tests/t.py::{long}[no-checksum]"},
        {"case": "crash", "what": "a", "result": "r", "figures": "1x", "test": "tests/t.py::test_short"},
    ]
    lines = suite_report.render(rows).splitlines()
    assert lines[2] == "| crash | a | r | 1x | `tests/t.py::test_short` |"
    assert lines[3].endswith(f"`tests/t.py::{long[:60]}[no-checksum]` |")
