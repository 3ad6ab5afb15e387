"""Runnable entry points: ``python -m recipes.<name>``."""
