"""Lightning callbacks of a run: LoRA export per epoch, sample images, metrics, the progress bar, SLURM requeue.

May import: the lower layers, ``lorafit.inference`` and ``lorafit.training``; never the CLI.
"""
