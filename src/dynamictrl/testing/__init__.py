"""Tiny random-weight models of the real architectures, saved in their real on-disk formats, for tests
and benchmarks: they go through the same loading code as real weights (DESIGN.md §3)."""
