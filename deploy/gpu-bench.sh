#!/usr/bin/env bash
# `enrich bench --json` with CUDA on a fresh GPU machine, within 5 minutes.
#
#   bash deploy/gpu-bench.sh        (in the repository root; the datasets at ../shared/datasets)
#
# It installs the project from pyproject.toml into var/gpu-venv (torch 2.14.1's Linux wheels on
# PyPI carry CUDA), starts a RabbitMQ on 127.0.0.1 where none answers, compares fp16 with
# fp32 on the same photos (`enrich bench precision`, and tests/worker/test_batching.py's CUDA
# test), then runs the benchmark. Figures go to $OUT (the device tool's folder) or out/gpu-bench/.
set -euo pipefail

cd "$(dirname "$0")/.."
started=$SECONDS
out=${OUT:-out/gpu-bench}
datasets=${DATASETS:-../shared/datasets}
venv=${VENV:-var/gpu-venv}
python=${PYTHON:-$(command -v python3.11 || command -v python3.12 || command -v python3)}
mkdir -p "$out"

say() { echo "[$((SECONDS - started)) s] $*" >&2; }

# 1. The project and its test runner, from the project's own files.
if [ ! -x "$venv/bin/enrich" ]; then
    say "installing into $venv with $python"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade "pip>=24"
    "$venv/bin/pip" install --quiet -e ".[local]" "pytest>=8"
fi
"$venv/bin/python" - <<'EOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"torch {torch.__version__} sees no CUDA device; this script needs one")
print(f"CUDA device: {torch.cuda.get_device_name(0)}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/nvidia-smi.csv" || true

# 2. A broker: the benchmark's worker consumes from RabbitMQ at 127.0.0.1:5672.
broker_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! broker_up; then
    if ! command -v rabbitmq-server >/dev/null; then
        say "installing rabbitmq-server"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server
    fi
    rabbitmq-server -detached
    for _ in $(seq 60); do broker_up && break; sleep 1; done
    broker_up || { echo "RabbitMQ did not start on 127.0.0.1:5672" >&2; exit 1; }
fi

export HF_HUB_OFFLINE=1 ENRICH_MODELS__DEVICE=cuda ENRICH_METRICS_PORT=0
export ENRICH_BATCH__MAX_SIZE=${ENRICH_BATCH__MAX_SIZE:-16}

# 3. Mixed precision against fp32 on the same photos: each stage's figures, and the check
#    that only the stages kept float32 by default move.
say "fp16 against fp32"
"$venv/bin/enrich" bench precision --json --data "$datasets" --photos 32 >"$out/precision.json"
"$venv/bin/python" -m pytest -q -p no:cacheprovider \
    "tests/worker/test_batching.py::test_float16_on_cuda_matches_float32_on_the_same_photos" \
    | tee "$out/mixed-precision.txt"

# 4. The benchmark: whatever is left of the 5 minutes, less a margin to write the files.
left=$((290 - (SECONDS - started)))
say "benchmark, at most $left s"
timeout "$left" "$venv/bin/enrich" bench --json --data "$datasets" --events 200 --photos 64 \
    >"$out/bench.json" 2>"$out/bench.log"
cat "$out/bench.json"
say "done"
