"""Seed-compatible names of the original packages, as configurations of the library's own layers."""
