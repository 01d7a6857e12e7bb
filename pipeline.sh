#!/usr/bin/env bash
# The whole job as a user types it: source training, transfer, evaluation, explanation, export.
# Usage: bash pipeline.sh DATA OUT     (DATA: a dataset folder, or "demo" for the built-in one)
# Set PYTHON to choose the interpreter (default: python) and AMP to choose train.py's and
# transfer.py's --amp (default: auto; AMP=off trains in float32 on any CPU).
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: bash pipeline.sh DATA OUT" >&2
  exit 2
fi
data=$1
out=$2
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python}
amp=${AMP:-auto}

step() {
  local started=$SECONDS
  echo "== $*"
  "$py" "$here/$@"
  echo "== $1 took $((SECONDS - started)) s"
}

step train.py --data "$data" --task source --amp "$amp" --out "$out/source"
step transfer.py --source "$out/source/model.pt" --data "$data" --task target --amp "$amp" --out "$out/target"
step evaluate.py --checkpoint "$out/target/model.pt" --data "$data" --task target --split val --out "$out/target/eval"
step explain.py --checkpoint "$out/target/model.pt" --data "$data" --task target --split val --out "$out/target/cam"
step export.py --checkpoint "$out/target/model.pt" --out "$out/target/model.onnx" --quantize int8
step evaluate.py --checkpoint "$out/target/model.int8.onnx" --data "$data" --task target --split val --out "$out/target/eval-int8"
echo "done in $SECONDS s: $out"
