"""Puts the repository root on sys.path, so that `pytest` (not only `python -m pytest`) imports
the top-level modules."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
