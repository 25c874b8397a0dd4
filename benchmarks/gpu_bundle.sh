#!/usr/bin/env bash
# Prepare what benchmarks/gpu_session.sh needs on a GPU machine with no network (run here, once):
#   .whl/  wheels of the packages its image lacks (Python 3.12, manylinux x86_64), without psycopg and lupa
#          (no PostgreSQL there, and fakeredis' Lua only serves the demo's private broker);
#   .gpu/  redis-server with the shared libraries it links beyond glibc, OpenSSL and the C++ runtime (the
#          image has those), all-MiniLM-L6-v2's config and
#          tokenizer (no weights: over the 64 MiB the device tool carries) and 1,000 English texts.
# Both are git-ignored through .git/info/exclude; name them in the device tool's `carry`.
#
#   benchmarks/gpu_bundle.sh            # then: device run `bash benchmarks/gpu_session.sh`, carry [".whl", ".gpu"]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# What the image lacks (KINDS.md beside the device tool lists what it has; transformers and torch are there).
WHEELS=(alembic amqp billiard bitsandbytes celery click-didyoumean click-plugins click-repl fakeredis greenlet
        kombu mako prompt-toolkit py-spy redis sqlalchemy tzdata tzlocal vine wcwidth)

mkdir -p .git/info
for path in /.whl/ /.gpu/; do grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >>.git/info/exclude; done

rm -rf .whl .gpu
mkdir -p .whl .gpu/lib .gpu/minilm
platforms=()
for tag in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
    manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform any -d .whl "${WHEELS[@]}"

redis=$(readlink -f "$(command -v redis-server)")
cp "$redis" .gpu/redis-server
ldd "$redis" | awk '/=> \// {print $3}' | while read -r lib; do
    # glibc, and what Python and PyTorch on that image link themselves (the carry is only 64 MiB), stay behind.
    case $(basename "$lib") in libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|ld-linux*|\
        libssl.so.*|libcrypto.so.*|libstdc++.so.*|libgcc_s.so.*) ;;
        *) cp -L "$lib" .gpu/lib/ ;;
    esac
done

minilm=$($PY -c "from pipeq.demo import minilm_path; print(minilm_path())")
for f in "$minilm"/*; do
    case $(basename "$f") in *.safetensors|*.bin|*.onnx|*.h5|*.msgpack|*.ot) ;; *) cp -r "$f" .gpu/minilm/ ;; esac
done
HF_HUB_OFFLINE=1 $PY benchmarks/run.py --dump-corpus .gpu/texts.json --langs en

du -sh .whl .gpu
total=$(du -sb .whl .gpu | awk '{s += $1} END {print s}')
echo "carry: $((total / 1048576)) MiB of the 64 MiB a device call takes (the repository's own files count too)"
