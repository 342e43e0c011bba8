#!/usr/bin/env bash
# One short GPU check (a machine with CUDA and this project's environment): train a couple of
# epochs on CUDA, export, compare ONNX Runtime with PyTorch, print epoch and total times.
#   bash benchmarks/gpu_check.sh [EPOCHS]
set -euo pipefail
cd "$(dirname "$0")/.."
epochs="${1:-2}"
work="$(mktemp -d)"
cp -r triton_repo "$work/triton_repo"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('gpu:', torch.cuda.get_device_name(0))"
start=$(date +%s.%N)
python3 -m mol_props.commands train \
  train.accelerator=cuda train.max_epochs="$epochs" train.progress=false \
  data.dvc.enabled=false export.dvc_track=false \
  logging.tracking_uri=http://127.0.0.1:9 logging.connect_timeout_s=0.5 \
  logging.fallback_uri="$work/mlruns" logging.plots_dir="$work/plots" \
  train.checkpoint_dir="$work/checkpoints" train.models_dir="$work/models" \
  export.checkpoint="$work/models/best.ckpt" export.onnx_path="$work/models/model.onnx" \
  export.dynamic_onnx_path="$work/models/model_dynamic_atoms.onnx" \
  export.metadata_path="$work/models/model.json" serving.triton_repo="$work/triton_repo"
end=$(date +%s.%N)
python3 - "$work" <<'PY'
import sqlite3
import sys
from pathlib import Path

database = Path(sys.argv[1]) / "mlruns" / "mlflow.db"
rows = sqlite3.connect(database).execute(
    "select step, value from metrics where key = 'epoch_seconds' order by step"
).fetchall()
for step, seconds in rows:
    print(f"epoch {step}: {seconds:.2f} s")
PY
echo "total (start-up, featurization, training, export + parity check): $(echo "$end - $start" | bc) s"
