"""Models and their training: backbones and heads, metrics, the epoch loop, the feature bank, resume state, heads trained together."""
