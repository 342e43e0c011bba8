#!/usr/bin/env bash
# One short GPU check (a machine with CUDA and this project's environment): default training on
# CUDA (EPOCHS caps it; the default config's own cap is 30, with early stopping; then the refit on
# train + val), export, compare ONNX Runtime with PyTorch, print each epoch's time and the total.
#   bash benchmarks/gpu_check.sh [EPOCHS] [ACCELERATOR]
# ACCELERATOR defaults to cuda; `bash benchmarks/gpu_check.sh 1 cpu` rehearses the script on a
# machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
epochs="${1:-30}"
accelerator="${2:-cuda}"
work="$(mktemp -d)"
cp -r triton_repo "$work/triton_repo"
python3 - "$accelerator" <<'PY'
import sys

import torch

if sys.argv[1] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device"
    print("gpu:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
start=$(date +%s.%N)
python3 -m mol_props.commands train \
  train.accelerator="$accelerator" train.max_epochs="$epochs" train.progress=false \
  data.dvc.enabled=false export.dvc_track=false \
  logging.tracking_uri=http://127.0.0.1:9 logging.connect_timeout_s=0.5 \
  logging.fallback_uri="$work/mlruns" logging.plots_dir="$work/plots" \
  train.checkpoint_dir="$work/checkpoints" train.models_dir="$work/models" \
  export.checkpoint="$work/models/best.ckpt" export.onnx_path="$work/models/model.onnx" \
  export.dynamic_onnx_path="$work/models/model_dynamic_atoms.onnx" \
  export.metadata_path="$work/models/model.json" serving.triton_repo="$work/triton_repo"
end=$(date +%s.%N)
python3 - "$work" "$start" "$end" <<'PY'
import sqlite3
import sys
from pathlib import Path

database = Path(sys.argv[1]) / "mlruns" / "mlflow.db"
for stage, key in (("epoch", "epoch_seconds"), ("refit epoch", "refit_epoch_seconds")):
    rows = sqlite3.connect(database).execute(
        "select step, value from metrics where key = ? order by step", (key,)
    ).fetchall()
    for step, seconds in rows:
        print(f"{stage} {step}: {seconds:.2f} s")
    if rows:
        times = sorted(seconds for _, seconds in rows)
        print(
            f"{stage}s: {len(rows)}, median {times[len(times) // 2]:.2f} s, "
            f"sum {sum(times):.1f} s"
        )
total = float(sys.argv[3]) - float(sys.argv[2])
print(f"total (start-up, featurization, training, export + parity check): {total:.1f} s")
PY
