"""Thin click CLIs: parse flags (params.yaml section + overrides), call pipeline, map errors to exit 2."""
