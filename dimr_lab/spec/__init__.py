"""Declarative specs: TOML in, validated dataclasses out, JSON-serialisable and round-tripping."""
