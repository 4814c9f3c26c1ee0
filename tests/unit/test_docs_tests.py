"""Every test the documents name as the proof of a claim exists: a renamed or deleted test leaves a claim
with no proof, and nothing else would say so."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: `file.py::test_name`; `file.py` alone; or `::test_name`, naming a test of the file named last before it.
#: A name ending in `*` names the tests it begins.
_REFERENCE = re.compile(r"`(?:([\w/]*test_\w+\.py))?(?:::(test_\w+\*?))?(?:\[[^`]*\])?`")


def _defined() -> dict[str, set[str]]:
    """Test functions by file name (files of one name in several suites pooled)."""
    tests: dict[str, set[str]] = {}
    for path in (ROOT / "tests").rglob("test_*.py"):
        names = re.findall(r"^(?:async )?def (test_\w+)\(", path.read_text(), re.M)
        tests.setdefault(path.name, set()).update(names)
    return tests


def _references() -> list[tuple[str, int, str, str]]:
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        current = ""
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for match in _REFERENCE.finditer(line):
                current = Path(match[1]).name if match[1] else current
                if match[2]:
                    found.append((doc.name, number, current, match[2]))
    return found


def _exists(test: str, names: set[str] | None) -> bool:
    if test.endswith("*"):
        return any(name.startswith(test[:-1]) for name in names or ())
    return test in (names or ())


def test_the_documents_name_tests_as_proof_and_each_one_exists() -> None:
    references, defined = _references(), _defined()
    assert len(references) > 20  # the pattern still reads the documents' way of naming tests
    unnamed = [(doc, n, test) for doc, n, file, test in references if not file]
    assert not unnamed, f"a `::test` with no file named before it: {unnamed}"
    missing = [f"{doc}:{n}: {f}::{test}" for doc, n, f, test in references if not _exists(test, defined.get(f))]
    assert not missing, "tests the documents name that do not exist:\n" + "\n".join(missing)
