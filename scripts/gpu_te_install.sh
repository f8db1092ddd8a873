#!/usr/bin/env bash
# Install Transformer Engine on the GPU machine (no internet) from carried files, into $SITE.
#
# Here (a machine with internet), once:
#   pip download --no-deps --only-binary=:all: ... transformer_engine_cu13==2.20.2 transformer_engine==2.20.2 \
#       pydantic pydantic_core annotated-types typing-inspection -d /tmp/te
#   pip download --no-deps --no-binary=:all: --no-build-isolation transformer_engine_torch==2.20.2 -d .whl_te
#   python scripts/te_slim_wheel.py /tmp/te/transformer_engine_cu13-*.whl --arch 90 --out .whl_te   # 276 -> 32 MB
#   cp /tmp/te/*.whl .whl_te/   (all but the full cu13 wheel)
# There, with .whl_te carried (about 37 MB, one call):
#   source scripts/gpu_te_install.sh          # exports PYTHONPATH; sets TE_OK=1 when TE imports
#
# transformer_engine_torch is a C++ torch extension published as source only: it is compiled here
# against the machine's own torch (about a minute on 16 cores). The built wheel is copied to
# $OUT/ (when set): put it in .whl_te/built/ and later calls install it instead of compiling.
SITE=${SITE:-/tmp/site}
TE_DIR=${TE_DIR:-.whl_te}
TE_OK=0
mkdir -p "$SITE"
wheels=$(ls "$TE_DIR"/*.whl 2>/dev/null | grep -v transformer_engine_torch)
if [ -z "$wheels" ]; then
  echo "gpu_te_install: no wheels in $TE_DIR (see the header of scripts/gpu_te_install.sh)" >&2
  return 1 2>/dev/null || exit 1
fi
built=$(ls "$TE_DIR"/built/transformer_engine_torch-*.whl 2>/dev/null | head -1)
if [ -z "$built" ]; then
  sdist=$(ls "$TE_DIR"/transformer_engine_torch-*.tar.gz | head -1)
  src=$(mktemp -d)
  tar xzf "$sdist" -C "$src"
  mkdir -p "$TE_DIR/built"
  t0=$(date +%s)
  ( cd "$src"/transformer_engine_torch-* && \
    NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_CUDA_ARCHS=90 NVTE_WITH_NCCL_EP=0 MAX_JOBS=$(nproc) \
    CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")} \
    python3 -m pip wheel -q --no-build-isolation --no-deps --no-cache-dir -w "$OLDPWD/$TE_DIR/built" . ) \
    > /tmp/te_torch_build.log 2>&1
  echo "gpu_te_install: transformer_engine_torch built in $(( $(date +%s) - t0 )) s (log /tmp/te_torch_build.log)"
  built=$(ls "$TE_DIR"/built/transformer_engine_torch-*.whl 2>/dev/null | head -1)
  if [ -z "$built" ]; then
    tail -30 /tmp/te_torch_build.log
    echo "gpu_te_install: building transformer_engine_torch failed" >&2
  elif [ -n "$OUT" ]; then
    cp "$built" "$OUT/"
  fi
fi
# One pip call for all of them: with --target, a later call replaces whole top-level folders, and
# the extension's wheel also ships a transformer_engine/ folder.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $wheels $built
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$built" ]; then
  if python3 -c "import transformer_engine.pytorch as te, transformer_engine as t; print('transformer_engine', t.__version__, 'OK')"; then
    TE_OK=1
  fi
fi
export TE_OK
