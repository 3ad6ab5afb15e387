"""Tests of the SLURM submit helper and of real jobs on a local single-node SLURM."""
