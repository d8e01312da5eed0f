"""Benchmarks of the EOFD loss: providers, shapes, the sweep and its report (method:
docs/design.md, "Benchmarks")."""
