#!/usr/bin/env bash
# GPU check on a lent GPU machine: nvidia-smi, torch sees CUDA, then benchmarks/gpu_check.py within ~8 minutes.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py arguments]       # e.g. --official .official/1d-tokenizer
#
# What it needs and how it gets there. The lent machines (nvidia-h100-x1, nvidia-h200) reach no network, no
# package registry either; their image's python3 has torch (CUDA), numpy, einops, pillow, safetensors, tqdm,
# pyyaml, accelerate, torchvision and huggingface_hub, but not webdataset/braceexpand (mstok's trainer imports
# them) nor omegaconf (the official TiTok code imports it). Those travel as wheels in an ignored folder of the
# checkout that the run tool carries (all pure Python, ~0.4 MB), made once on the developer's machine:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl webdataset==1.0.2 braceexpand==0.1.7 omegaconf==2.4.0
#
# The official code (only with --official) travels the same way: the files of a bytedance/1d-tokenizer checkout
# that its stage-1 model needs, from a clone or a bare git dir of it (OFFICIAL_GIT):
#
#   echo /.official/ >> .git/info/exclude; mkdir -p .official/1d-tokenizer
#   git -C "$OFFICIAL_GIT" archive HEAD modeling configs utils LICENSE | tar -x -C .official/1d-tokenizer
#
# Then, with the run tool: command `bash benchmarks/gpu_check.sh`, carry [".whl", ".official"], timeout_s 540.
# .official/1d-tokenizer is used when present (else pass --official DIR). With $OUT set (the run tool sets it)
# the log, the rewritten benchmarks/RESULTS.md and benchmarks/history/gpu_check.md are copied there: copy them
# over the checkout's files to keep the run.
#
# Installs nothing when `import torch, mstok, mstok.training` (and omegaconf with --official) already works in
# $PYTHON (default python3) with this checkout's src/ first on PYTHONPATH. Otherwise it creates a venv
# ($GPU_CHECK_VENV, default /tmp/mstok-gpu-check-venv) that sees $PYTHON's packages and installs only the
# missing ones into it: from the wheelhouse ($WHEELHOUSE, default .whl) when there is one, else from the
# registries (a machine that reaches them; torch then comes with its dependencies).
#
# Environment: PYTHON, WHEELHOUSE, GPU_CHECK_VENV, BUDGET (timed seconds per row, default 8), MAX_MINUTES (rows
# that would end later are skipped, default 6.5), GPU_CHECK_TIMEOUT (hard limit on the python run in seconds,
# default 450), GPU_CHECK_ALLOW_CPU=1 (run without CUDA: for testing the script with --device cpu).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-$ROOT/.whl}
VENV=${GPU_CHECK_VENV:-/tmp/mstok-gpu-check-venv}
BUDGET=${BUDGET:-8}
MAX_MINUTES=${MAX_MINUTES:-6.5}
TIMEOUT=${GPU_CHECK_TIMEOUT:-450}
started=$(date +%s)
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" # this checkout's mstok, never an installed one

echo "== nvidia-smi"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi || echo "(nvidia-smi failed)"
else
    echo "(nvidia-smi not found)"
fi

args=("$@")
official=""
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
    --official) official=${args[i + 1]:-} ;;
    --official=*) official=${args[i]#--official=} ;;
    esac
done
if [[ -z "$official" && -f "$ROOT/.official/1d-tokenizer/modeling/titok.py" ]]; then
    official="$ROOT/.official/1d-tokenizer"
    args+=(--official "$official")
    echo "== using the official code in $official"
fi

# module -> pip name of what the run imports (the official code's needs only with --official)
needed=(torch:torch numpy:numpy einops:einops PIL:pillow safetensors:safetensors tqdm:tqdm yaml:pyyaml
    braceexpand:braceexpand webdataset:webdataset)
if [[ -n "$official" ]]; then
    needed+=(omegaconf:omegaconf accelerate:accelerate torchvision:torchvision huggingface_hub:huggingface_hub)
fi

missing() { # the pip names of the modules "$1" (a python) cannot import
    local py=$1 item out=()
    for item in "${needed[@]}"; do
        "$py" -c "import ${item%%:*}" >/dev/null 2>&1 || out+=("${item#*:}")
    done
    echo "${out[*]}"
}

echo "== python: $PY"
todo=$(missing "$PY")
if [[ -z "$todo" ]] && "$PY" -c "import torch, mstok, mstok.training" >/dev/null 2>&1; then
    echo "torch, mstok and what the run imports are there: installing nothing"
else
    echo "missing: ${todo:-(none; mstok itself does not import)}; venv $VENV sees $PY's packages and gets these"
    if [[ ! -x "$VENV/bin/python" ]]; then
        "$PY" -m venv --without-pip "$VENV"
    fi
    site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    # the given python's own site folders (a venv's too, with their .pth files), after the venv's
    "$PY" -c "import site, sys; print('import site; ' + '; '.join(f'site.addsitedir({p!r})' for p in
        site.getsitepackages() + [site.getusersitepackages()]))" >"$site/zz_base_python.pth"
    torch_spec=()
    light=()
    for name in $todo; do
        if [[ $name == torch ]]; then torch_spec=(torch); else light+=("$name"); fi
    done
    if [[ -d "$WHEELHOUSE" ]] && compgen -G "$WHEELHOUSE/*.whl" >/dev/null; then
        echo "installing from the wheelhouse $WHEELHOUSE: $todo"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --find-links "$WHEELHOUSE" --target "$site" \
            ${light[@]+"${light[@]}"} ${torch_spec[@]+"${torch_spec[@]}"}
    else
        echo "no wheelhouse at $WHEELHOUSE: installing from the registries"
        if ((${#light[@]})); then
            "$PY" -m pip install -q --no-deps --no-compile --target "$site" "${light[@]}"
        fi
        if ((${#torch_spec[@]})); then
            "$PY" -m pip install -q --no-compile --target "$site" torch
        fi
    fi
    PY="$VENV/bin/python"
    still=$(missing "$PY")
    if [[ -n "$still" ]] || ! "$PY" -c "import torch, mstok, mstok.training"; then
        echo "still missing after the install: ${still:-mstok (see the error above)}" >&2
        exit 3
    fi
fi

echo "== torch and CUDA"
if ! "$PY" -c "
import sys, torch
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(), f'{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB')
sys.exit(0 if torch.cuda.is_available() else 1)
"; then
    if [[ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]]; then
        echo "torch sees no CUDA device (GPU_CHECK_ALLOW_CPU=1 runs anyway, for testing with --device cpu)" >&2
        exit 2
    fi
fi

echo "== benchmarks/gpu_check.py (--budget $BUDGET s per row, --max-minutes $MAX_MINUTES, hard limit ${TIMEOUT} s)"
log=${OUT:+$OUT/gpu_check.log}
status=0
set -o pipefail
timeout --kill-after=15 "$TIMEOUT" "$PY" benchmarks/gpu_check.py --budget "$BUDGET" --max-minutes "$MAX_MINUTES" \
    "${args[@]}" 2>&1 | tee "${log:-/dev/null}" || status=$?
if [[ -n "${OUT:-}" ]]; then
    cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
    [[ -f benchmarks/history/gpu_check.md ]] && cp benchmarks/history/gpu_check.md "$OUT/history_gpu_check.md"
fi
echo "== done in $(($(date +%s) - started)) s (gpu_check.py exit status $status)"
exit "$status"
