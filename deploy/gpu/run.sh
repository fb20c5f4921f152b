#!/usr/bin/env bash
# The one prepared device run (docs/gpu.md). From the repository root, within BUDGET_S seconds by the clock:
#   install  the carried wheels (.whl) into a target folder, and print the versions;
#   train    the default model (vae/train/configs/long.yaml, continuing the shipped weights' schedule) until
#            RESERVE_S seconds are left, stopped with SIGTERM (the trainer checkpoints and exits 143);
#   export   its EMA weights to $OUT/default (fp16 safetensors);
#   eval     Kodak on the device (latentd eval --json);
#   tests    pytest -m gpu;
#   bench-codec, bench-serve   latentd bench codec / bench serve on the device;
#   summary  $OUT/summary.json and $OUT/summary.md; everything printed goes to $OUT/run.log too.
# A failing stage is logged and the next one runs; each stage gets at most the time left.
#
#   bash deploy/gpu/run.sh                                          # on the device (make gpu-run)
#   DEVICE=cpu BUDGET_S=150 OUT=out/gpu-dry bash deploy/gpu/run.sh  # the CPU dry run, tiny settings
#
# Environment: DEVICE (cuda), BUDGET_S (540), OUT (out/gpu-run where the device tool sets none), PY (python3),
# WHEELS (.whl; without wheels the packages already importable are used), DATA (.gpu-data, from pack.sh), ONLY
# (stage names: run just these, e.g. ONLY="install tests"), and the stage settings below (TRAIN_*, BENCH_*,
# SERVE_ARGS, RESERVE_S).
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
export ROOT=$PWD
START=$(date +%s)
export BUDGET_S=${BUDGET_S:-540}
export DEADLINE=$((START + BUDGET_S))
export DEVICE=${DEVICE:-cuda}
export PY=${PY:-python3}
export WHEELS=${WHEELS:-.whl}
export DATA=${DATA:-.gpu-data}
export PYTHONUNBUFFERED=1
export LATENTD_LOG_REQUESTS=false
OUT=${OUT:-$ROOT/out/gpu-run}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
export OUT
export WORK
WORK=$(mktemp -d "${TMPDIR:-/tmp}/latentd-gpu-run.XXXXXX") || exit 2
export SITE=${SITE:-$WORK/site}
export RUN=$WORK/train-run
export STAGES=$WORK/stages.tsv
export SUMMARY_S=${SUMMARY_S:-8}  # kept back for the summary at the end

if [ "$DEVICE" = cpu ]; then  # the dry run: every stage, tiny
    : "${TRAIN_BATCH:=2}" "${TRAIN_CROP:=64}" "${TRAIN_WORKERS:=0}" "${TRAIN_STEPS:=2}" "${TRAIN_PRECISION:=no}"
    : "${VAL_IMAGES:=1}" "${STAT_IMAGES:=2}" "${LOG_EVERY:=1}" "${RESERVE_S:=$((BUDGET_S / 2))}"
    : "${TRAIN_GRACE_S:=20}" "${BENCH_MODEL:=default}" "${BENCH_SIZES:=32}" "${BENCH_DTYPES:=float32}"
    : "${BENCH_RUNS:=1}" "${SERVE_ARGS:=--sizes 128 --ops encode --clients 2 --requests 1 --rounds 1 --max-batch-size 2}"
else
    # One H200: batches of 16 crops of 256 px (the recipe's CPU batch is 2), bf16, 12 of the 16 cores decoding.
    : "${TRAIN_BATCH:=16}" "${TRAIN_CROP:=256}" "${TRAIN_WORKERS:=12}" "${TRAIN_STEPS:=}" "${TRAIN_PRECISION:=bf16}"
    : "${VAL_IMAGES:=16}" "${STAT_IMAGES:=256}" "${LOG_EVERY:=50}" "${RESERVE_S:=210}"
    : "${BENCH_MODEL:=sd}" "${BENCH_SIZES:=512 1024}" "${BENCH_DTYPES:=float16 bfloat16}" "${BENCH_RUNS:=5}"
    : "${SERVE_ARGS:=--sizes 256 512 --clients 16 --requests 64 --rounds 1}"
fi
: "${SAVE_EVERY:=1000}" "${VAL_EVERY:=1000}" "${TRAIN_GRACE_S:=60}" "${BENCH_BATCH:=1}" "${EVAL_DTYPE:=float32}"
export TRAIN_BATCH TRAIN_CROP TRAIN_WORKERS TRAIN_STEPS TRAIN_PRECISION VAL_IMAGES STAT_IMAGES LOG_EVERY RESERVE_S
export EVAL_DTYPE BENCH_MODEL BENCH_SIZES BENCH_DTYPES BENCH_RUNS BENCH_BATCH SERVE_ARGS SAVE_EVERY VAL_EVERY TRAIN_GRACE_S

left() { echo $((DEADLINE - $(date +%s))); }
export -f left

# run_stage NAME CAP_S FUNCTION: FUNCTION in its own process group, stopped after min(CAP_S, time left).
run_stage() {
    local name=$1 cap=$2 fn=$3 limit rc status t0
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
        echo "== $name: skipped, not in ONLY"
        printf '%s\tskipped\t-\t0\n' "$name" >>"$STAGES"
        return 1
    fi
    limit=$(($(left) - SUMMARY_S))
    [ "$cap" -lt "$limit" ] && limit=$cap
    if [ "$limit" -lt 3 ]; then
        echo "== $name: skipped, no time left"
        printf '%s\tskipped\t-\t0\n' "$name" >>"$STAGES"
        return 1
    fi
    echo "== $name (at most ${limit} s; $(left) s of the budget left)"
    t0=$(date +%s)
    timeout -k 5 "$limit" bash -c "$fn"
    rc=$?
    case $rc in
        0) status=pass ;;
        124 | 137) status=timeout ;;
        *) status=fail ;;
    esac
    echo "== $name: $status (exit $rc, $(($(date +%s) - t0)) s)"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(($(date +%s) - t0))" >>"$STAGES"
    return $rc
}

stage_install() {
    set -o pipefail
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$WHEELS"/*.whl || return 1
        # The latentd wheel leaves the packaged weights to the tree, which travels anyway: put them where
        # the full wheel has them.
        if [ -d "$SITE/latentd/vae" ]; then
            (cd vae/weights && find . -type f \( -name '*.json' -o -name '*.safetensors' -o -name '*.md' \)) |
                while read -r file; do
                    mkdir -p "$SITE/latentd/vae/weights/$(dirname "$file")"
                    cp -n "vae/weights/$file" "$SITE/latentd/vae/weights/$file"
                done
        fi
    else
        echo "no wheels in $WHEELS: using the packages already importable"
    fi
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    "$PY" deploy/gpu/summary.py versions >"$WORK/versions.json" && cat "$WORK/versions.json"
}

stage_train() {
    set -o pipefail
    local dirs start args pid end limit next_report rc
    dirs=$(find "$DATA/train" -mindepth 1 -maxdepth 1 -type d | sort | paste -sd, -)
    [ -n "$dirs" ] || { echo "no training folders under $DATA/train"; return 1; }
    args=(--no-progress --no-export
          --data.train_dirs "[$dirs]" --data.val_dir "$DATA/val" --data.val_max_images "$VAL_IMAGES"
          --data.batch_size "$TRAIN_BATCH" --data.crop_size "$TRAIN_CROP" --data.workers "$TRAIN_WORKERS"
          --runtime.precision "$TRAIN_PRECISION" --runtime.output_dir "$RUN" --runtime.tensorboard false
          --runtime.save_every "$SAVE_EVERY" --runtime.val_every "$VAL_EVERY" --runtime.log_every "$LOG_EVERY")
    if [ -n "$TRAIN_STEPS" ]; then  # a fixed number of steps past the shipped weights' (the dry run)
        start=$("$PY" -c "import json,pathlib; p=pathlib.Path('vae/weights/default/training_state.json'); \
print(json.loads(p.read_text())['step'] if p.is_file() else 0)") || return 1
        args+=(--optim.max_steps $((start + TRAIN_STEPS)))
    fi
    echo "latentd train vae/train/configs/long.yaml ${args[*]}"
    "$PY" -m latentd.client.cli train vae/train/configs/long.yaml "${args[@]}" &
    pid=$!
    end=$(($(date +%s) + $(left) - RESERVE_S - TRAIN_GRACE_S / 2))
    next_report=$(($(date +%s) + 60))
    while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$end" ]; do
        sleep 1
        if [ "$(date +%s)" -ge "$next_report" ]; then
            [ -f "$RUN/metrics.csv" ] &&
                echo "train: $(tail -n 1 "$RUN/metrics.csv" | cut -d, -f1-3,12) (step, loss, reconstruction, steps/s)"
            command -v nvidia-smi >/dev/null && echo "train: GPU $(nvidia-smi --format=csv,noheader \
                --query-gpu=utilization.gpu,memory.used,power.draw 2>/dev/null | head -n 1) (busy, memory, power)"
            next_report=$((next_report + 60))
        fi
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "train: time is up, SIGTERM (the trainer checkpoints and stops)"
        kill -TERM "$pid"
        limit=$(($(date +%s) + TRAIN_GRACE_S))
        while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$limit" ]; do sleep 1; done
        kill -0 "$pid" 2>/dev/null && { echo "train: no exit after SIGTERM; SIGKILL"; kill -KILL "$pid"; }
    fi
    wait "$pid"
    rc=$?
    echo "train: exit $rc"
    [ -f "$RUN/metrics.csv" ] && cp "$RUN/metrics.csv" "$OUT/metrics.csv"
    # 143: stopped by the signal; a signal before the trainer's handler was set leaves no checkpoint
    compgen -G "$RUN/checkpoints/step-*" >/dev/null || { echo "train: no checkpoint"; return 1; }
    [ "$rc" -eq 0 ] || [ "$rc" -eq 143 ]
}

stage_export() {
    "$PY" -m latentd.client.cli export "$RUN" -o "$OUT/default" --dtype float16 --stat-images "$STAT_IMAGES"
}

stage_eval() {
    set -o pipefail
    # float32 by default, like the model card's CPU figures it is compared with
    "$PY" -m latentd.client.cli eval --model "$OUT/default" --images "$DATA/kodak" --device "$DEVICE" \
        --dtype "$EVAL_DTYPE" --json >"$WORK/eval.json"
    local rc=$?
    "$PY" deploy/gpu/summary.py eval "$WORK/eval.json"
    return $rc
}

stage_tests() {
    set -o pipefail
    "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/gpu 2>&1 | tee "$WORK/pytest.txt"
}

stage_bench_codec() {
    local rc=0 size dtype
    for size in $BENCH_SIZES; do
        for dtype in $BENCH_DTYPES; do
            echo "latentd bench codec --model $BENCH_MODEL --size $size --dtype $dtype --device $DEVICE"
            # --same-process: the separate diffusers process measures CPU allocator settings, not GPU work.
            "$PY" -m latentd.client.cli bench codec --model "$BENCH_MODEL" --size "$size" --batch "$BENCH_BATCH" \
                --dtype "$dtype" --device "$DEVICE" --runs "$BENCH_RUNS" --same-process --json \
                >"$WORK/bench-codec-$size-$dtype.json" || rc=1
            "$PY" deploy/gpu/summary.py codec "$WORK/bench-codec-$size-$dtype.json"
        done
    done
    return $rc
}

stage_bench_serve() {
    # shellcheck disable=SC2086  # SERVE_ARGS is a list of options
    "$PY" -m latentd.client.cli bench serve --model default --device "$DEVICE" $SERVE_ARGS --json \
        >"$WORK/bench-serve.json"
}
export -f stage_install stage_train stage_export stage_eval stage_tests stage_bench_codec stage_bench_serve

main() {
    echo "latentd device run: DEVICE=$DEVICE BUDGET_S=$BUDGET_S OUT=$OUT on $(hostname) at $(date -u +%FT%TZ)"
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    fi
    run_stage install 120 stage_install
    # The trainer stops itself RESERVE_S before the deadline; the cap is a safety net.
    run_stage train "$BUDGET_S" stage_train
    run_stage export 120 stage_export
    run_stage eval 120 stage_eval
    run_stage tests 150 stage_tests
    run_stage bench-codec 240 stage_bench_codec
    run_stage bench-serve 240 stage_bench_serve
    local summarized=0
    timeout -k 2 "$SUMMARY_S" "$PY" deploy/gpu/summary.py summary --stages "$STAGES" --work "$WORK" --out "$OUT" \
        --data "$DATA" --budget "$BUDGET_S" --started "$START" --device "$DEVICE" || {
        summarized=$?
        echo "summary failed (exit $summarized); the stages as recorded are in $OUT/stages.tsv"
        cp "$STAGES" "$OUT/stages.tsv"
    }
    echo "done in $(($(date +%s) - START)) s of $BUDGET_S; in $OUT:"
    (cd "$OUT" && find . -type f | sort)
    [ "$summarized" -eq 0 ] && ! grep -qv $'\tpass\t' "$STAGES"
}

{  # one compound command: parsed whole before it runs, so an edit of this file cannot change a run under way
    main 2>&1 | tee "$OUT/run.log"
    rc=${PIPESTATUS[0]}
    rm -rf "$WORK"
    exit "$rc"
}
