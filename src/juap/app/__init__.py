"""The application layer beside the commands: run folders, saved artifacts, reports and figures, run logs.

It may import the core (:mod:`juap.attacks`, :mod:`juap.interpreters`, ...) and the foundation
(:mod:`juap.runtime`); neither imports it (``tests/test_layers.py``).
"""
