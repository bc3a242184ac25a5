"""The applications: one module per command of the `juap` CLI, each with its config and `run_*`."""
