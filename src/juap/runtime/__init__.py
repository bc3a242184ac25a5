"""Plumbing for running loops safely: checkpoints, run folders, artifacts, configs, torchrun."""
