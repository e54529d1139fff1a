"""Prefect tasks and the logic under them: data, modelling, training loops, evaluation, tracking."""
