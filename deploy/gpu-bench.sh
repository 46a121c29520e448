#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, on a machine lent through the device tool (an H200).
#
# That machine reaches nothing outside it (no PyPI, no ../shared), runs the image's own
# Python 3.12 with torch, torchvision, transformers and timm, and takes at most 64 MiB per
# call, the working tree (about 29 MiB, the demo models included) counted in. So the run is
# prepared here and the rest travels in three calls:
#
#   here     bash deploy/gpu-bench.sh pack    (right before the calls: the parts are sized
#                                              by the working tree as it is then)
#            var/device/bundle    wheels of what the image lacks, 70 product photos, the
#                                 manifest and last part of all-MiniLM-L6-v2's weights
#            var/device/minilm-1  the other two parts, each below the limit
#            var/device/minilm-2
#   device   run(command="bash deploy/gpu-bench.sh check", carry=["var/device/bundle"],
#                timeout_s=240)
#            run(command="bash deploy/gpu-bench.sh parts", carry=["var/device/minilm-1"])
#            run(command="bash deploy/gpu-bench.sh run", carry=["var/device/minilm-2"],
#                timeout_s=480)
#            give_back()
#
# Each call must come within 30 s of the last: a warm machine keeps what earlier calls
# carried (each reply says whether it is still `warm`), a fresh one starts bare. Every mode
# begins by listing the parts that are there; after a cold start carry the missing ones
# again, in any order, with `run` last. var/ is ignored by git: the photos copied there serve
# the device call only and are never committed.
#
# `check` installs the wheels, imports what the run needs, and segments and tags one photo
# on the GPU (about a minute). `run` joins the weights, checks their sha256, and runs four
# steps, each under its own time limit, going on past a failed one. $OUT gets run.log (the
# steps' logs) and:
#   precision.json   each stage under float16 against float32 on the same 32 photos
#   stages-16.json   each stage alone at batch 1 and 16, float16 where it holds
#   stages-32.json   the same at batch 32
#   stages-fp32.json batch 16 with mixed precision off
#   nvidia-smi.csv
# The whole worker's servers (RabbitMQ, Postgres, S3) do not fit: end-to-end figures come
# from `enrich bench` on a machine with the servers (docs/benchmarks.md).
set -euo pipefail

cd "$(dirname "$0")/.."
mode=${1:-}
device_dir=var/device
bundle=$device_dir/bundle
started=$SECONDS
say() { echo "[$((SECONDS - started)) s] $*" >&2; }

# Distributions the stages import that the device image lacks (its list: the device tool's
# KINDS.md), at the versions installed here. timm travels although the image has one: the
# tagger's fastai export pickles timm modules, which must unpickle as they were saved.
LACKING=(
    pydantic pydantic-core annotated-types typing-inspection typing-extensions pydantic-settings
    python-dotenv structlog timm fastai fastcore fastprogress fastdownload fasttransform
    plum-dispatch beartype python-fasthtml starlette itsdangerous python-multipart pytz
    celery kombu amqp billiard vine
)
MAX_CARRY=$((64 * 1024 * 1024))

pack() {
    local python=${PACK_PYTHON:-.venv/bin/python}
    local datasets=${DATASETS:-../shared/datasets}
    local pyver=${DEVICE_PYTHON_VERSION:-3.12}
    rm -rf "$device_dir"
    mkdir -p "$bundle/wheels" "$bundle/minilm" "$device_dir/minilm-1" "$device_dir/minilm-2"

    say "wheels for Python $pyver"
    local specs=()
    for name in "${LACKING[@]}"; do
        specs+=("$name==$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
    done
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$bundle/wheels" "${specs[@]}"

    say "70 product photos from $datasets"
    "$python" - "$datasets" "$bundle/datasets" <<'EOF'
import shutil, sys
from pathlib import Path
from worker.bench_stages import bench_products
source, target = Path(sys.argv[1]), Path(sys.argv[2])
# Whole rows of the classes' interleave, so that the copy gives back at least 64 photos.
classes = sum(1 for folder in (source / "clothing-small" / "validation").iterdir())
for product in bench_products(source, -(-64 // classes) * classes):
    copy = target / product.photo.relative_to(source)
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(product.photo, copy)
EOF

    say "all-MiniLM-L6-v2 in three parts"
    local model
    model=$("$python" -c "from handlers.embedding import default_embedding_model_dir as d; print(d())")
    cp -r "$model/." "$bundle/minilm/"
    rm "$bundle/minilm/model.safetensors"
    sha256sum "$model/model.safetensors" | cut -d' ' -f1 >"$bundle/minilm/model.safetensors.sha256"
    # Two parts as large as a call can carry beside the tree, the rest with the bundle.
    local tree_bytes room
    tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s |
        awk '{total += $1} END {print total}')
    room=$((MAX_CARRY - tree_bytes - 2 * 1024 * 1024))
    dd if="$model/model.safetensors" of="$device_dir/minilm-1/part-1" bs=1M iflag=count_bytes \
        count="$room" status=none
    dd if="$model/model.safetensors" of="$device_dir/minilm-2/part-2" bs=1M \
        iflag=skip_bytes,count_bytes skip="$room" count="$room" status=none
    dd if="$model/model.safetensors" of="$bundle/minilm/part-3" bs=1M iflag=skip_bytes \
        skip=$((2 * room)) status=none

    for carried in "$bundle" "$device_dir/minilm-1" "$device_dir/minilm-2"; do
        local bytes
        bytes=$(du -sb "$carried" | cut -f1)
        say "$carried: $((bytes / 1024 / 1024)) MiB, with the tree $(((bytes + tree_bytes) / 1024 / 1024)) MiB"
        if [ $((bytes + tree_bytes)) -gt $MAX_CARRY ]; then
            echo "$carried and the working tree exceed the device tool's 64 MiB" >&2
            exit 1
        fi
    done
}

site=${DEVICE_SITE:-/tmp/enrich-site}
python=${PYTHON:-python3}
pieces=("$bundle/wheels" "$bundle/minilm/part-3" "$device_dir/minilm-1/part-1"
    "$device_dir/minilm-2/part-2")

# Which of the carried parts are here; with `all`, fails naming the missing ones.
parts() {
    local missing=()
    for piece in "${pieces[@]}"; do
        if [ -e "$piece" ]; then say "here: $piece"; else missing+=("$piece"); fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "missing: ${missing[*]} (a fresh machine, or not carried yet)"
        if [ "${1:-}" = all ]; then exit 1; fi
    fi
}

install() {
    if [ ! -f "$site/.installed" ]; then
        say "installing $(ls "$bundle/wheels" | wc -l) wheels into $site"
        "$python" -m pip install --quiet --no-index --no-deps --no-compile --upgrade \
            --target "$site" "$bundle"/wheels/*.whl
        touch "$site/.installed"
    fi
    export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
    export HF_HUB_OFFLINE=1 ENRICH_METRICS_PORT=0
    export ENRICH_MODELS__DEVICE=${ENRICH_MODELS__DEVICE:-cuda}
    "$python" - <<'EOF'
import importlib, sys
missing = []
for module in ("worker.bench_stages", "worker.precision", "worker.cli"):
    try:
        importlib.import_module(module)
    except ImportError as error:
        missing.append(f"{module}: {error!r}")
if missing:
    raise SystemExit("cannot import what the run needs:\n" + "\n".join(missing))
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__},"
      f" CUDA device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}")
EOF
}

check() {
    parts
    install
    "$python" -m worker.cli bench stages --help >/dev/null
    say "the segmenter and the tagger on $ENRICH_MODELS__DEVICE, one photo"
    timeout 180 "$python" - "$bundle/datasets" <<'EOF'
import sys
from pathlib import Path

from handlers.segmentation import load_segmenter
from handlers.tagging import Tagger
from schemas.settings import get_settings
from worker.bench_stages import bench_products

settings = get_settings()
models = settings.models
(product,) = bench_products(Path(sys.argv[1]), 1)
pixels = product.pixels(settings.images.max_pixels)
segmenter = load_segmenter(
    models.segmentation_backend,
    models.segmenter_dir,
    device=models.device,
    score_threshold=models.mask_score_threshold,
)
(segmentation,) = segmenter.segment([pixels])
(tags,) = Tagger(model_dir=models.tagger_dir, device=models.device).tag([pixels])
labels = [label.label for label in tags.labels]
print(f"{product.photo.name}: masks {segmentation.pred_classes}, labels {labels}")
EOF
}

failed=()

# One step of the run: its stdout to $out/NAME, the rest to run.log; a failed step is
# recorded and the next one runs. The limits are an H200's; STEP_TIME_SCALE stretches them
# (a CPU rehearsal needs about 4).
step() {
    local name=$1 limit=$(($2 * ${STEP_TIME_SCALE:-1}))
    shift 2
    say "$name"
    if ! timeout "$limit" "$@" >"$out/$name" 2>>"$out/run.log"; then
        failed+=("$name")
        say "$name failed (see run.log)"
    fi
}

run() {
    out=${OUT:-out/gpu-bench}
    local model=/tmp/all-MiniLM-L6-v2
    mkdir -p "$out"
    parts all
    install

    say "joining all-MiniLM-L6-v2's weights"
    rm -rf "$model" && cp -r "$bundle/minilm" "$model"
    cat "$device_dir/minilm-1/part-1" "$device_dir/minilm-2/part-2" "$model/part-3" \
        >"$model/model.safetensors"
    rm "$model/part-3" "$model/model.safetensors.sha256"
    if [ "$(sha256sum "$model/model.safetensors" | cut -d' ' -f1)" != \
        "$(cat "$bundle/minilm/model.safetensors.sha256")" ]; then
        echo "the joined weights differ from the packed ones: pack and carry all parts again" >&2
        exit 1
    fi
    export ENRICH_MODELS__EMBEDDING_DIR=$model

    # ENRICH_MODELS__DEVICE=cpu tries the script out on a machine without a GPU.
    local on_cpu=() data=$bundle/datasets enrich=("$python" -m worker.cli bench)
    if [ "$ENRICH_MODELS__DEVICE" = cpu ]; then on_cpu=(--cpu-dtype float16); fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
        >"$out/nvidia-smi.csv" 2>>"$out/run.log" || true

    step precision.json 150 "${enrich[@]}" precision --json --data "$data" --photos 32 \
        "${on_cpu[@]}"
    step stages-16.json 100 env ENRICH_BATCH__MAX_SIZE=16 "${enrich[@]}" stages --json \
        --data "$data" --photos 64
    step stages-32.json 100 env ENRICH_BATCH__MAX_SIZE=32 "${enrich[@]}" stages --json \
        --data "$data" --photos 64
    step stages-fp32.json 100 env ENRICH_BATCH__MAX_SIZE=16 ENRICH_BATCH__MIXED_PRECISION=false \
        "${enrich[@]}" stages --json --data "$data" --photos 64
    if [ ${#failed[@]} -gt 0 ]; then
        say "failed: ${failed[*]}"
        exit 1
    fi
    say "done"
}

case "$mode" in
    pack) pack ;;
    parts) parts ;;
    check) check ;;
    run) run ;;
    *)
        echo "usage: bash deploy/gpu-bench.sh pack|parts|check|run (see the top of this file)" >&2
        exit 2
        ;;
esac
