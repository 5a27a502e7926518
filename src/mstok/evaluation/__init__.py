"""Evaluation: metrics, FLOP counting."""
