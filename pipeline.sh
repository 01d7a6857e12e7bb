#!/usr/bin/env bash
# The whole job as a user types it: source training, transfer, evaluation, explanation, export.
# Usage: bash pipeline.sh DATA OUT     (DATA: a dataset folder, or "demo" for the built-in one)
# Environment: PYTHON, the interpreter (default: python); AMP, train.py's and transfer.py's
# --amp (default: auto; AMP=off trains in float32 on any CPU); SEED, the --seed of train.py,
# transfer.py and export.py (default: 0).
# Exit codes: 0 every step done; 3 every step done, but export.py's int8 gate refused every
# recipe, so there is no model.int8.onnx (the verified fp32 model.onnx is written) and its
# evaluation is skipped; otherwise the exit code of the step that failed (2: bad input or
# usage, 130: interrupted), where the pipeline stops.
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
seed=${SEED:-0}

step() {
  local started=$SECONDS status=0
  echo "== $*"
  "$py" "$here/$@" || status=$?
  echo "== $1 took $((SECONDS - started)) s"
  return $status
}

step train.py --data "$data" --task source --amp "$amp" --seed "$seed" --out "$out/source"
step transfer.py --source "$out/source/model.pt" --data "$data" --task target --amp "$amp" --seed "$seed" --out "$out/target"
step evaluate.py --checkpoint "$out/target/model.pt" --data "$data" --task target --split val --out "$out/target/eval"
step explain.py --checkpoint "$out/target/model.pt" --data "$data" --task target --split val --out "$out/target/cam"
exported=0
step export.py --checkpoint "$out/target/model.pt" --out "$out/target/model.onnx" --quantize int8 --seed "$seed" || exported=$?
if [ "$exported" -eq 3 ]; then
  echo "pipeline.sh: warning: no int8 model: export.py's gate refused every int8 recipe (figures above);" \
       "the verified fp32 model is $out/target/model.onnx; skipping the int8 evaluation" >&2
elif [ "$exported" -ne 0 ]; then
  exit "$exported"
else
  step evaluate.py --checkpoint "$out/target/model.int8.onnx" --data "$data" --task target --split val --out "$out/target/eval-int8"
fi
echo "done in $SECONDS s: $out"
exit "$exported"
