#!/usr/bin/env bash
# Build a TensorRT engine for Triton from the exported fixed-shape ONNX model, with trtexec.
# Run it on the GPU that will serve the engine, with the TensorRT version of that Triton release
# (an engine only loads into the TensorRT it was built with): see README.md, "TensorRT".
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$SCRIPT_DIR")"
TRITON_CONFIG="$REPO_ROOT/triton_repo/mol_props_trt/config.pbtxt"
# Only when the Triton config cannot be read: the max_batch_size it holds at the time of writing.
FALLBACK_MAX_BATCH=256

usage() {
  cat <<EOF
Usage: scripts/onnx2trt.sh [OPTIONS] [-- EXTRA_TRTEXEC_OPTIONS...]

Builds a TensorRT engine from the fixed-shape ONNX model with trtexec. The atom and feature
dimensions are read from the model; only the batch axis gets a min/opt/max profile.

Options:
  --onnx PATH        ONNX model (default: models/model.onnx, written by \`mol_props export\`)
  --output PATH      engine file (default: triton_repo/mol_props_trt/1/model.plan)
  --fp16             allow FP16 kernels (default: FP32 only)
  --min-batch N      smallest batch of the profile (default: 1)
  --opt-batch N      batch TensorRT tunes kernels for (default: the max batch)
  --max-batch N      largest batch (default: max_batch_size in
                     triton_repo/mol_props_trt/config.pbtxt, $(default_max_batch))
  --trtexec PATH     trtexec binary (default: \$TRTEXEC, else trtexec on PATH, else
                     /usr/src/tensorrt/bin/trtexec as in the TensorRT containers)
  --dry-run          print the trtexec command and exit; needs neither trtexec nor a GPU
  -h, --help         show this help

Default paths are relative to the repository root; paths you give, to the current directory.
Example, inside the TensorRT container of your Triton release:
  scripts/onnx2trt.sh --fp16
EOF
}

fail() {
  echo "onnx2trt.sh: error: $1" >&2
  exit "${2:-1}"
}

usage_error() {
  echo "onnx2trt.sh: $1" >&2
  echo "Try 'scripts/onnx2trt.sh --help'." >&2
  exit 2
}

default_max_batch() {
  # The engine's largest batch must be at least the max_batch_size Triton will send it.
  local value=""
  if [[ -f "$TRITON_CONFIG" ]]; then
    value="$(sed -n 's/^[[:space:]]*max_batch_size:[[:space:]]*\([0-9][0-9]*\).*/\1/p' \
      "$TRITON_CONFIG" | head -n 1)"
  fi
  echo "${value:-$FALLBACK_MAX_BATCH}"
}

positive_integer() {
  # $1: option name, $2: value
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || usage_error "$1 needs a positive integer, got '$2'"
}

find_trtexec() {
  if [[ -n "$trtexec" ]]; then
    [[ -x "$trtexec" ]] || fail "trtexec not found or not executable at $trtexec"
    echo "$trtexec"
  elif [[ -n "${TRTEXEC:-}" ]]; then
    [[ -x "$TRTEXEC" ]] || fail "\$TRTEXEC=$TRTEXEC is not an executable file"
    echo "$TRTEXEC"
  elif command -v trtexec >/dev/null 2>&1; then
    command -v trtexec
  elif [[ -x /usr/src/tensorrt/bin/trtexec ]]; then
    echo /usr/src/tensorrt/bin/trtexec
  else
    fail "trtexec not found (not on PATH, not at /usr/src/tensorrt/bin/trtexec).
  It ships with TensorRT: run this script inside the TensorRT container of your Triton release
  (README.md, "TensorRT"), or pass --trtexec PATH. --dry-run prints the command without it." 3
  fi
}

check_gpu() {
  # TensorRT builds kernels for the GPU it runs on, so there must be one.
  command -v nvidia-smi >/dev/null 2>&1 ||
    fail "no NVIDIA GPU visible (nvidia-smi not found).
  TensorRT builds the engine on the GPU that will run it: start the container with --gpus all." 4
  local gpus
  gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  [[ "$gpus" -gt 0 ]] ||
    fail "no NVIDIA GPU visible (nvidia-smi -L lists none).
  TensorRT builds the engine on the GPU that will run it: start the container with --gpus all." 4
}

onnx="$REPO_ROOT/models/model.onnx"
output="$REPO_ROOT/triton_repo/mol_props_trt/1/model.plan"
fp16=false
dry_run=false
min_batch=1
opt_batch=""
max_batch=""
trtexec=""
extra=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --fp16) fp16=true ;;
    --dry-run) dry_run=true ;;
    --onnx | --output | --min-batch | --opt-batch | --max-batch | --trtexec)
      [[ $# -ge 2 && -n "$2" ]] || usage_error "$1 needs a value"
      case "$1" in
        --onnx) onnx="$2" ;;
        --output) output="$2" ;;
        --min-batch) min_batch="$2" ;;
        --opt-batch) opt_batch="$2" ;;
        --max-batch) max_batch="$2" ;;
        --trtexec) trtexec="$2" ;;
      esac
      shift
      ;;
    --onnx=* | --output=* | --min-batch=* | --opt-batch=* | --max-batch=* | --trtexec=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}"
      continue
      ;;
    --)
      shift
      extra=("$@")
      break
      ;;
    *) usage_error "unknown option '$1'" ;;
  esac
  shift
done

triton_max_batch="$(default_max_batch)"
max_batch="${max_batch:-$triton_max_batch}"
opt_batch="${opt_batch:-$max_batch}"
positive_integer --max-batch "$max_batch"
positive_integer --opt-batch "$opt_batch"
positive_integer --min-batch "$min_batch"
((min_batch <= opt_batch && opt_batch <= max_batch)) ||
  usage_error "need --min-batch <= --opt-batch <= --max-batch, got $min_batch, $opt_batch, $max_batch"
if ((max_batch < triton_max_batch)); then
  echo "onnx2trt.sh: warning: --max-batch $max_batch is below Triton's max_batch_size" \
    "$triton_max_batch ($TRITON_CONFIG): Triton will refuse to load this engine there" >&2
fi

[[ -f "$onnx" ]] || fail "ONNX model $onnx not found.
  Make it with \`uv run mol_props export\` (or \`uv run mol_props train\`, which exports at the end)."
python="${PYTHON:-python3}"
command -v "$python" >/dev/null 2>&1 || fail "$python is needed to read the model's input shapes"

shapes="$("$python" "$SCRIPT_DIR/onnx_shapes.py" "$onnx" "$min_batch" "$opt_batch" "$max_batch")" ||
  fail "cannot read the input shapes of $onnx (see above)"
{
  read -r min_shapes
  read -r opt_shapes
  read -r max_shapes
} <<<"$shapes"

command=(
  --onnx="$onnx"
  --minShapes="$min_shapes"
  --optShapes="$opt_shapes"
  --maxShapes="$max_shapes"
)
if [[ "$fp16" == true ]]; then
  command+=(--fp16)
fi
command+=("${extra[@]}")

if [[ "$dry_run" == true ]]; then
  shown=()
  for argument in "${trtexec:-${TRTEXEC:-trtexec}}" "${command[@]}" --saveEngine="$output"; do
    # Quoted only where the shell needs it, so the printed command stays copyable and readable.
    if [[ "$argument" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
      shown+=("$argument")
    else
      shown+=("$(printf '%q' "$argument")")
    fi
  done
  echo "${shown[*]}"
  exit 0
fi

binary="$(find_trtexec)"
check_gpu
mkdir -p "$(dirname "$output")"
echo "onnx2trt.sh: building $output from $onnx (batch $min_batch/$opt_batch/$max_batch," \
  "$([[ "$fp16" == true ]] && echo fp16 || echo fp32))" >&2
# trtexec writes beside the final name, then the engine is moved into place: Triton polling the
# repository never sees a half-written model.plan.
partial="$(dirname "$output")/.$(basename "$output").partial"
status=0
"$binary" "${command[@]}" --saveEngine="$partial" || status=$?
if ((status != 0)); then
  rm -f "$partial"
  fail "trtexec failed with exit status $status (its log is above)" "$status"
fi
[[ -s "$partial" ]] || fail "trtexec reported success but wrote no engine to $partial" 5
mv -f "$partial" "$output"
echo "onnx2trt.sh: engine written to $output" >&2
