#!/usr/bin/env bash
# The README's main command: install, build the tiny SDXL model and a generated dataset (offline,
# only if absent), then train a LoRA on it with configs/demo.yaml on the CPU (a couple of minutes).
# Extra arguments go to `lorafit fit`, e.g. `bash tools/demo.sh --trainer.max_epochs 5`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || . .venv/bin/activate
export HF_HUB_OFFLINE=1

lorafit tiny sdxl demo/tiny-sdxl       # tiny random-weight SDXL-architecture pipeline
lorafit demo-data demo/data            # kohya-style folder: demo/data/5_ohwx star/*.png + .txt
lorafit fit --config configs/demo.yaml "$@"

echo
echo "Demo done. LoRA files (kohya format for A1111/ComfyUI, diffusers format under diffusers/):"
ls -1 runs/demo/lora runs/demo/lora/diffusers
echo "Resolved config: runs/demo/config.yaml   TensorBoard: tensorboard --logdir runs/demo"
