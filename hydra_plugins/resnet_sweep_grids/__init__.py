"""``hydra/sweeper=grids``: Hydra's grid sweeper over a union of grids (the study's tables are not
one cartesian product: Adam at 7 learning rates, SGD with three heads at 6)."""
