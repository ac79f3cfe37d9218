"""Experiments on top of the engine and the Lightning layer: arms x seeds comparisons, their
summaries, reports and plots."""
