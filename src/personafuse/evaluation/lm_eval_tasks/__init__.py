"""lm-eval task configs that read local copies of official benchmark files (``--include_path``)."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
