"""PDE problems, their reference solvers and their stored instances."""
