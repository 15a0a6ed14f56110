"""Showing a run: plots in its folder, a self-contained HTML report, TensorBoard events."""
