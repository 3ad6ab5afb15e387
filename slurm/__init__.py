"""Launching recipes on SLURM clusters (sbatch templates and the submit helper)."""
