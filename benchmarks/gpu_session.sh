#!/usr/bin/env bash
# A GPU machine's checks, in one call (benchmarks/RESULTS-GPU.md says what they measured).
#
#   benchmarks/gpu_session.sh [bench|profile|tests] ...   (default: bench tests)
#
# The machine has no network, Redis or PostgreSQL. Carried beside the repository (git-ignored; `make gpu-bundle`,
# i.e. benchmarks/gpu_bundle.sh, prepares both here):
#   .whl/  wheels of what its image lacks (celery, kombu, billiard, vine, amqp, click-*, prompt-toolkit,
#          wcwidth, tzdata, tzlocal, redis, sqlalchemy, greenlet, alembic, mako, fakeredis, py-spy,
#          bitsandbytes for the int8 tests);
#   .gpu/  redis-server and its shared libraries (.gpu/lib), all-MiniLM-L6-v2's config and tokenizer
#          (.gpu/minilm, weights left out for size: speed does not depend on them) and the English texts
#          (.gpu/texts.json, from `benchmarks/run.py --dump-corpus .gpu/texts.json --langs en`).
# Logs go to $OUT (the device tool's folder that comes back), else ./gpu-out.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(bench tests)

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PIPEQ_MINILM_PATH=$PWD/.gpu/minilm
LD_LIBRARY_PATH=$PWD/.gpu/lib .gpu/redis-server --port 6379 --save '' --appendonly no --daemonize yes >/dev/null || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import os, torch, transformers, tokenizers; print(os.cpu_count(), 'cores', torch.__version__, \
transformers.__version__, tokenizers.__version__)"

GPU=(python3 benchmarks/gpu.py --device cuda:0 --corpus .gpu/texts.json --model-src .gpu/minilm)
for step in "${steps[@]}"; do
    echo "== $step $(date +%T)"
    case $step in
    bench)  # the GPU rows: f c d e in turns
        timeout 200 "${GPU[@]}" --precisions fp16 --concurrency "${PIPEQ_GPU_CONCURRENCY:-1,auto}" --rounds 2 \
            2>&1 | tee "$OUT/bench.log" ;;
    profile)  # where the GIL goes in (c) and in one worker's child: py-spy samples of the thread holding it
        timeout 150 py-spy record --gil --subprocesses --rate 200 --format raw -o "$OUT/spy.txt" -- \
            "${GPU[@]}" --precisions fp16 --concurrency 1 --rounds 1 --n 60000 2>&1 | tail -15 | tee "$OUT/profile.log" ;;
    tests)
        timeout 200 python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/tests.log" ;;
    *) echo "unknown step $step"; exit 2 ;;
    esac
done
echo "== done $(date +%T)"
