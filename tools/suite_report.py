"""Run the fault, crash, access and load parts of the test suite and put their own report
into docs/test-report.md (between the suite-report markers).

    python tools/suite_report.py            # runs the tests (slow ones included), rewrites docs/test-report.md
    python tools/suite_report.py --check    # exit 1 if the report's table is missing
    WC_SUITE_REPORT=r.json python -m pytest -q && python tools/suite_report.py --from r.json
                                            # the same table from a whole-suite run that passed

Each row comes from a report(...) call in a test that passed; nothing in the table is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "test-report.md"
START, END = "<!-- suite-report:start -->", "<!-- suite-report:end -->"
TESTS = ["tests/system/test_lifecycle.py", "tests/system/test_faults.py", "tests/system/test_hostile.py", "tests/system/test_validation.py",
         "tests/system/test_access.py", "tests/system/test_service.py", "tests/system/test_load.py",
         "tests/system/test_hostile_sources.py", "tests/system/test_hostile_fd.py", "tests/system/test_early_cold_node.py"]  # fmt: skip
ORDER = ["crash", "full disk", "disk", "corruption", "network", "early", "hostile files", "hostile requests",
         "access", "load"]  # fmt: skip


def render(rows: list[dict[str, str]]) -> str:
    rows = sorted(rows, key=lambda r: (ORDER.index(r["case"]) if r["case"] in ORDER else 99, r["what"]))
    out = ["| case | what was done | result | figures | test |", "|---|---|---|---|---|"]
    for r in rows:
        path, name = r["test"].split("::", 1)
        func, bracket, param = name.partition("[")  # a long name is cut, its parameters kept
        out.append(
            f"| {r['case']} | {r['what']} | {r['result']} | {r['figures']} | `{path}::{func[:60]}{bracket}{param}` |"
        )
    return "\n".join(out)


def _run_tests() -> list[dict[str, str]] | None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        env = dict(os.environ, WC_SUITE_REPORT=str(out))
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=ROOT, env=env)
        if r.returncode != 0:
            print(f"tests failed: {DOC.relative_to(ROOT)} is not updated", file=sys.stderr)
            return None
        rows: list[dict[str, str]] = json.loads(out.read_text())
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--from", dest="source", type=Path, help="render the rows a passing pytest run wrote here")
    a = ap.parse_args()
    text = DOC.read_text()
    if a.check:
        return 0 if START in text and END in text and "| case |" in text else 1
    if a.source is not None:
        rows = json.loads(a.source.read_text())
    else:
        rows = _run_tests()
        if rows is None:
            return 1
    table = f"{START}\n{render(rows)}\n{END}"
    if START in text:
        text = text[: text.index(START)] + table + text[text.index(END) + len(END) :]
    else:
        text += "\n" + table + "\n"
    DOC.write_text(text)
    print(f"{len(rows)} rows written to {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
