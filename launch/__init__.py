"""Batch sweeps of experiments.main on local processes and Slurm; see launch/README.md."""
