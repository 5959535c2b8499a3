"""Shared pytest options: `--slow` also runs the notebook cells flagged `#| slow` (full-scale runs)."""


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run notebook cells flagged '#| slow' (full-scale, GPU-sized runs)")
