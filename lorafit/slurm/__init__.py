"""``lorafit submit``: render and submit a SLURM sbatch script for ``lorafit fit``.

May import: ``lorafit.errors``, ``lorafit.io``.
"""
