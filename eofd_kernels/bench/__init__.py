"""Benchmarks of the EOFD loss: providers, shapes, the sweep and its report (DESIGN §6)."""
