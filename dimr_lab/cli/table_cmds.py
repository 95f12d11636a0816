"""Commands: placeholder until implemented."""
from dimr_lab.cli import app  # noqa: F401
