"""The solvers, one method per module. Each is a :class:`~linsolve_rbp.solvers._base.Solver`
registered by name in :mod:`linsolve_rbp.solve`."""
