#!/usr/bin/env bash
# One-GPU smoke check, not part of CI: for each task a few training steps and a validation in bf16-mixed
# precision with channels-last memory, on the synthetic shapes configs with tiny overrides; then the
# classifier once more under the DDP strategy with the Trainer's sync_batchnorm and a frozen stage
# (SyncBatchNorm only trains on GPUs). Prints a summary; exits non-zero if any check failed.
#
#     bash tools/gpu_check.sh [WORK_DIR]        # logs, data and checkpoints go to WORK_DIR (default: a temp dir)
#
# ACCELERATOR=cpu runs the same checks without a GPU (slowly; the SyncBatchNorm check is skipped there).

set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${1:-$(mktemp -d -t resbone_gpu_check.XXXXXX)}
PYTHON=${PYTHON:-python}
ACCELERATOR=${ACCELERATOR:-gpu}
mkdir -p "$WORK"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export RESBONE_CACHE="$WORK/cache"

# The tools need LightningCLI's jsonargparse[signatures] and the detection evaluator pycocotools.
PREFLIGHT="import pycocotools; from lightning.pytorch.cli import _JSONARGPARSE_SIGNATURES_AVAILABLE as ok; assert ok, ok"
if ! "$PYTHON" -c "$PREFLIGHT" >"$WORK/preflight.log" 2>&1; then
    tail -n 3 "$WORK/preflight.log"
    echo "gpu_check: the environment lacks the project's dependencies (pip install -e '.[dev]'); nothing was run"
    exit 2
fi

COMMON=(
    --trainer.accelerator "$ACCELERATOR" --trainer.devices 1 --trainer.precision bf16-mixed
    --trainer.max_epochs 1 --trainer.enable_progress_bar false --trainer.log_every_n_steps 1
    --model.channels_last true
)
declare -a NAMES=() RESULTS=() SECONDS_TAKEN=()

# check NAME PATTERN COMMAND...: runs COMMAND, logging to $WORK/NAME.log; passes if it exits 0 and
# its output matches PATTERN (a metric name the validation prints).
check() {
    local name=$1 pattern=$2
    shift 2
    local log="$WORK/$name.log" start=$SECONDS result=PASS
    echo "== $name: $*" | tee "$log"
    if ! "$@" >>"$log" 2>&1; then
        result="FAIL (exit status; see $log)"
    elif ! grep -q -- "$pattern" "$log"; then
        result="FAIL (no $pattern in the output; see $log)"
    fi
    NAMES+=("$name")
    RESULTS+=("$result")
    SECONDS_TAKEN+=($((SECONDS - start)))
    [[ $result == PASS ]] || tail -n 30 "$log"
}

# fit_and_validate NAME TOOL CONFIG PATTERN OVERRIDES...: a short fit, then a validation of its last checkpoint.
fit_and_validate() {
    local name=$1 tool=$2 config=$3 pattern=$4
    shift 4
    local dir="$WORK/$name"
    local args=(--config "$ROOT/$config" "${COMMON[@]}" --trainer.default_root_dir "$dir" "$@")
    check "${name}_fit" "Trainer.fit" "$PYTHON" "$ROOT/tools/$tool" fit "${args[@]}"
    local ckpt
    ckpt=$(find "$dir" -name last.ckpt 2>/dev/null | head -n 1)
    if [[ -z $ckpt ]]; then
        NAMES+=("${name}_validate")
        RESULTS+=("FAIL (no last.ckpt under $dir)")
        SECONDS_TAKEN+=(0)
        return
    fi
    check "${name}_validate" "$pattern" "$PYTHON" "$ROOT/tools/$tool" validate "${args[@]}" --ckpt_path "$ckpt"
}

fit_and_validate detection train_det.py configs/detection/faster_rcnn_r18_fpn_shapes.yaml val_bbox_AP \
    --data.root "$WORK/shapes" --data.num_train 32 --data.num_val 8 --data.batch_size 8 --data.num_workers 2 \
    --model.warmup 2

fit_and_validate segmentation train_seg.py configs/segmentation/deeplabv3plus_r18_os16_shapes.yaml val_mIoU \
    --data.root "$WORK/shapes_seg" --data.num_train 32 --data.num_val 8 --data.val_batch_size 4 \
    --data.batch_size 8 --data.num_workers 2 --model.warmup 2

fit_and_validate classification train_cls.py configs/classification/resnet18_shapes.yaml val_top1 \
    --data.root "$WORK/shapes_cls" --data.train_per_class 16 --data.val_per_class 4 --data.batch_size 16

if [[ $ACCELERATOR != cpu ]]; then
    # Trainer(sync_batchnorm=True) under DDP: the trainable batch norms become SyncBatchNorm, the frozen
    # stem and layer1 stay plain and frozen (backbones.training.distributed prints the counts).
    check classification_sync_bn "frozen ones keep theirs" "$PYTHON" "$ROOT/tools/train_cls.py" fit \
        --config "$ROOT/configs/classification/resnet18_shapes.yaml" "${COMMON[@]}" \
        --trainer.strategy ddp --trainer.sync_batchnorm true --model.model_options.frozen_stages 1 \
        --trainer.default_root_dir "$WORK/classification_sync_bn" \
        --data.root "$WORK/shapes_cls" --data.train_per_class 16 --data.val_per_class 4 --data.batch_size 16
fi

echo
echo "gpu_check summary ($ACCELERATOR, bf16-mixed, channels-last; logs in $WORK)"
failed=0
for i in "${!NAMES[@]}"; do
    printf '  %-28s %4ss  %s\n' "${NAMES[$i]}" "${SECONDS_TAKEN[$i]}" "${RESULTS[$i]}"
    [[ ${RESULTS[$i]} == PASS ]] || failed=$((failed + 1))
done
if ((failed)); then
    echo "$failed of ${#NAMES[@]} checks failed"
    exit 1
fi
echo "all ${#NAMES[@]} checks passed"
