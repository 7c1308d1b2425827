#!/usr/bin/env bash
# One-shot GPU check of issue 13: Strata's harvest and training speed on a GPU, beside a bare forward and beside
# EleutherAI sparsify on the same GPU. Two steps:
#
#   bash scripts/gpu_check.sh prepare     # here, with network: what the GPU machine lacks, into .whl/ and .gpu/
#   bash scripts/gpu_check.sh run         # on the GPU machine (no network): results into $OUT (default gpu-out/)
#   bash scripts/gpu_check.sh run --device cpu --quick     # dry run of the same sequence on a CPU, in minutes
#
# The GPU machine has python3 with CUDA torch, transformers, h5py, safetensors, numpy, einops, accelerate, but no
# network, so `prepare` downloads the wheels it lacks (Strata's pydantic family, gguf; eai-sparsify and its own
# needs) for CPython 3.12 into .whl/ (ignored by git; carried to the machine). The embedded SmolLM2 package
# (94 MB) is too big to carry, so `prepare` saves only its config and tokenizer into .gpu/smollm2-shape/ and `run`
# builds a randomly initialised model of exactly that shape there: speed depends on the shapes, not the weights.
# With the device tool:  run(command="bash scripts/gpu_check.sh run", carry=[".whl", ".gpu"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WHEELS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 gguf==0.19.0
        eai-sparsify==1.3.3 simple-parsing==0.1.9 docstring-parser==0.18.0 schedulefree==1.4.1 natsort==8.4.0
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
        einops==0.8.2 accelerate==1.15.0)  # the last two are on the GPU image already: for a CPU dry run

prepare() {
    local exclude
    exclude=$(git rev-parse --git-path info/exclude)
    for d in /.whl/ /.gpu/; do grep -qx "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"; done
    mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    PYTHONPATH=$ROOT "$PY" - <<'EOF'
from activations.model import load_model
lm = load_model("smollm2-135m")
lm.model.config.save_pretrained(".gpu/smollm2-shape")
lm.tokenizer.save_pretrained(".gpu/smollm2-shape")
print("saved SmolLM2's config and tokenizer to .gpu/smollm2-shape")
EOF
    du -sh .whl .gpu
}

run() {
    local device=cuda quick=0
    while [ $# -gt 0 ]; do
        case $1 in
            --device) device=$2; shift 2 ;;
            --quick) quick=1; shift ;;
            *) echo "gpu_check.sh run: unknown option $1 (use --device DEV, --quick)" >&2; exit 2 ;;
        esac
    done
    OUT=${OUT:-$ROOT/gpu-out}
    mkdir -p "$OUT"
    exec > >(tee "$OUT/gpu_check.log") 2>&1
    export PYTHONUNBUFFERED=1
    if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
        # only what this interpreter lacks: the machine's own torch, numpy, transformers stay
        missing=()
        for w in .whl/*.whl; do
            name=$(basename "$w" | cut -d- -f1 | tr _ -)
            "$PY" -m pip show -q "$name" > /dev/null 2>&1 || missing+=("$w")
        done
        if [ ${#missing[@]} -gt 0 ]; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/strata-site "${missing[@]}"
        fi
    fi
    export PYTHONPATH=$ROOT:/tmp/strata-site
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    local model=/tmp/smollm2-shape threads
    threads=$(nproc)
    "$PY" - "$model" <<'EOF'
import sys, torch, transformers as tf
src, dest = ".gpu/smollm2-shape", sys.argv[1]
torch.manual_seed(0)
tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(src)).save_pretrained(dest)
tf.AutoTokenizer.from_pretrained(src).save_pretrained(dest)
print("SmolLM2-shaped model (random weights) in", dest)
EOF
    local tokens=65536 extra=()
    [ $quick = 1 ] && tokens=2048 && extra=(--quick)
    echo "== harvest: fp32 / bf16 / auto, each beside a bare forward in the same precision"
    "$PY" scripts/bench_harvest.py --model "$model" --device "$device" --tokens $tokens --only 1,2 \
        --threads "$threads" --json "$OUT/harvest.json"
    echo "== training step: strata beside sparsify on the same device"
    "$PY" scripts/bench_sparsify.py --device "$device" "${extra[@]}" --json "$OUT/train_vs_sparsify.json"
    echo "== scripts/bench_train.py (its own device choice)"
    "$PY" scripts/bench_train.py --threads "$threads" "${extra[@]}" || echo "bench_train.py failed (exit $?)"
    echo "results in $OUT"
}

case ${1:-} in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: bash scripts/gpu_check.sh prepare | run [--device cpu --quick]" >&2; exit 2 ;;
esac
