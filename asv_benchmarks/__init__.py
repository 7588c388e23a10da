"""asv benchmarks of linsolve_rbp (see docs/benchmarks.rst)."""
