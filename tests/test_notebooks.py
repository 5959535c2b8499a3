"""Run every chapter in nbs/ through nbdev's own test runner, one pytest test per notebook.

Cells flagged `#| slow` are skipped unless pytest is given `--slow`; this mirrors `nbdev_test --flags slow`.
"""
from pathlib import Path

import pytest
import nbdev.test as nbtest

NBS = Path(__file__).resolve().parent.parent / "nbs"
NOTEBOOKS = sorted(p for p in NBS.glob("*.ipynb") if not p.name.startswith("_"))


def test_every_chapter_is_collected():
    "Guard against an empty or misplaced nbs/ folder: a run that tests no notebook must fail."
    assert len(NOTEBOOKS) >= 1, f"no notebooks found in {NBS}"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(nb, request):
    slow = request.config.getoption("--slow")
    ok, seconds = nbtest.test_nb(nb, skip_flags=[] if slow else ["slow"], force_flags=["slow"] if slow else [],
                                 showerr=True)
    assert ok, f"{nb.name} failed (see the traceback above)"
