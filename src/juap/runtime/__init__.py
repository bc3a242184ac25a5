"""The foundation: the training-loop engine, checkpoints, safe files, configs and torchrun plumbing.

It knows how to run a loop, not what is inside it: nothing here imports the core (attacks, interpreters,
classifiers, data, ...) or the application (``tests/test_layers.py``).
"""
