"""The shared library of the three RLHF steps. It never imports a step."""
