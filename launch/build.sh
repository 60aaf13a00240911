#!/usr/bin/env bash
# Installs missing dependencies, configures build/ (Release; CUDA is detected by CMakeLists.txt) and builds.
# Extra arguments go to the cmake configure step, e.g. ./launch/build.sh -DPIPEQUANT_CUDA=OFF
# PIPEQUANT_SKIP_DEPS=1 skips the dependency check; PIPEQUANT_BUILD_DIR overrides build/.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${PIPEQUANT_BUILD_DIR:-$REPO/build}"
JOBS="$(nproc 2>/dev/null || echo 2)"

if [ "${PIPEQUANT_SKIP_DEPS:-0}" != "1" ]; then
  "$REPO/launch/install_deps.sh"
fi

echo "build: configure $BUILD_DIR (Release)"
cmake -S "$REPO" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release "$@"
echo "build: compile with $JOBS jobs"
cmake --build "$BUILD_DIR" -j "$JOBS"
echo "build: binary at $BUILD_DIR/pipequant"
