"""Importing this module registers every built-in component (see dimr_lab.registry)."""

from dimr_lab.nn import attention, blocks, conditioning, heads, layers, norms  # noqa: F401
