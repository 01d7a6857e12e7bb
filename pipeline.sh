#!/usr/bin/env bash
# The whole job as a user types it: training (and transfer), evaluation, explanation, export.
# Usage: bash pipeline.sh DATA OUT [--source CKPT | --source-data DIR...] [--model NAME]
#                         [--weights NAME|FILE] [--image-size N] [--resize squash|crop|pad]
#                         [--skip-bad-images]
#   DATA: the dataset to end up with a model for, or "demo" for the built-in one.
#   - DATA in the CSV layout with a source and a target task (the reference landmarks, demo):
#     train.py on the source task, then transfer.py onto the target task.
#   - DATA of one task (ImageFolder layout): train.py on it, once; no transfer step.
#   - --source CKPT: transfer.py from that checkpoint onto DATA (its model, size and resize).
#   - --source-data DIR: train.py on DIR (its source task if it has one), then transfer.py onto DATA;
#     given more than once, train.py learns from all of them as one source task (classes matched by
#     name), e.g. --source-data ../shared/data/landmarks --source-data ../shared/data/landmarks-128.
#   --model, --weights, --image-size and --resize go to train.py (a transfer takes them from its
#   source); --weights DEFAULT starts from torchvision's published weights for --model.
#   --skip-bad-images goes to every step: unreadable images are left out with a warning.
# Environment: PYTHON, the interpreter (default: python); AMP, the --amp of train.py and
# transfer.py (default: auto; AMP=off trains in float32 on any CPU); SEED, the --seed of train.py,
# transfer.py and export.py (default: 0).
# Exit codes: 0 every step done; 3 every step done, but export.py's int8 gate refused every
# recipe, so there is no model.int8.onnx (the verified fp32 model.onnx is written) and its
# evaluation is skipped; 2 a bad command line; otherwise the exit code of the step that failed
# (2: bad input, 130: interrupted), where the pipeline stops.
set -euo pipefail
usage() {
  echo "usage: bash pipeline.sh DATA OUT [--source CKPT | --source-data DIR...] [--model NAME]" \
       "[--weights NAME|FILE] [--image-size N] [--resize squash|crop|pad] [--skip-bad-images]" >&2
  [ $# -eq 0 ] || echo "pipeline.sh: error: $*" >&2
  exit 2
}
[ $# -ge 2 ] || usage
data=$1
out=$2
shift 2
source_checkpoint="" source_data=() train_options=() load_options=()
while [ $# -gt 0 ]; do
  if [ "$1" = --skip-bad-images ]; then
    load_options=(--skip-bad-images)
    shift
    continue
  fi
  [ $# -ge 2 ] || usage "$1 needs a value"
  case $1 in
    --source) source_checkpoint=$2 ;;
    --source-data) source_data+=("$2") ;;
    --model|--weights|--image-size|--resize) train_options+=("$1" "$2") ;;
    *) usage "unknown option $1" ;;
  esac
  shift 2
done
[ -z "$source_checkpoint" ] || [ ${#source_data[@]} -eq 0 ] || usage "give --source or --source-data, not both"
[ -z "$source_checkpoint" ] || [ ${#train_options[@]} -eq 0 ] ||
  usage "${train_options[0]}: a transfer takes the model, weights, image size and resize of --source $source_checkpoint"
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

# The task flag training on these datasets needs: the CSV layout holds tasks, ImageFolder data is one.
has_tasks() { [ "$1" = demo ] || [ -f "$1/landmarks.csv" ]; }
task_of() {
  local task=$1 dataset
  shift
  for dataset in "$@"; do
    if has_tasks "$dataset"; then echo "--task $task"; return; fi
  done
}

if [ -n "$source_checkpoint" ]; then
  source_model=$source_checkpoint
elif [ ${#source_data[@]} -gt 0 ] || has_tasks "$data"; then
  [ ${#source_data[@]} -gt 0 ] || source_data=("$data")
  # shellcheck disable=SC2046  # task_of gives two words or none
  step train.py --data "${source_data[@]}" $(task_of source "${source_data[@]}") "${train_options[@]}" \
    "${load_options[@]}" --amp "$amp" --seed "$seed" --out "$out/source"
  source_model=$out/source/model.pt
fi
task=$(task_of target "$data")
if [ -n "${source_model:-}" ]; then
  model_dir=$out/target
  # shellcheck disable=SC2086
  step transfer.py --source "$source_model" --data "$data" $task "${load_options[@]}" --amp "$amp" --seed "$seed" \
    --out "$model_dir"
else
  model_dir=$out/model
  step train.py --data "$data" "${train_options[@]}" "${load_options[@]}" --amp "$amp" --seed "$seed" --out "$model_dir"
fi
model=$model_dir/model.pt
# shellcheck disable=SC2086
step evaluate.py --checkpoint "$model" --data "$data" $task --split val "${load_options[@]}" --out "$model_dir/eval"
# shellcheck disable=SC2086
step explain.py --checkpoint "$model" --data "$data" $task --split val "${load_options[@]}" --out "$model_dir/cam"
exported=0
step export.py --checkpoint "$model" --out "$model_dir/model.onnx" --quantize int8 --seed "$seed" \
  "${load_options[@]}" || exported=$?
if [ "$exported" -eq 3 ]; then
  echo "pipeline.sh: warning: no int8 model: export.py's gate refused every int8 recipe (figures above);" \
       "the verified fp32 model is $model_dir/model.onnx; skipping the int8 evaluation" >&2
elif [ "$exported" -ne 0 ]; then
  exit "$exported"
else
  # shellcheck disable=SC2086
  step evaluate.py --checkpoint "$model_dir/model.int8.onnx" --data "$data" $task --split val \
    "${load_options[@]}" --out "$model_dir/eval-int8"
fi
echo "done in $SECONDS s: $model_dir"
exit "$exported"
