"""Benchmarks: scripts that print tables and write JSON (never asserted in tests)."""
