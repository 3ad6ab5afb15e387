"""Launching recipes on SLURM clusters.

``python -m slurm.submit <recipe> --nodes N --gpus-per-node G --time T -- <recipe flags>`` checks the
recipe flags, writes ``<run_dir>/slurm/submit.sbatch`` (one task per GPU, ``--signal=USR1@90``,
``--requeue``, ``--open-mode=append``) and submits it. ``template.sbatch`` in this package is the
documented template for those who write their own batch files. Recipes are known here only by module
name: nothing in this package imports them.
"""
