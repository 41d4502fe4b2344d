"""Training-step benchmark on the real SD1.5/SDXL architectures with random weights (tools/bench.py).

architectures: published configs -> random-weight models; module: lorafit's module on them;
flops: FlopCounter counts on meta; settings: the grid and presets; runner: lorafit's Lightning step
and the plain reference loop timed side by side; devices: clocks, memory, peaks; report: rows;
memory: the step's peak GPU memory ESTIMATED on fake tensors (with cuda_autocast and
flash_attention modelling what a GPU does differently from the CPU).
"""
