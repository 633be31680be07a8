"""The configuration: typed schemas, checks without torch, the objective, run names, resolvers."""
