#!/usr/bin/env bash
# Installs the Debian packages pipequant needs to build and test, and only those that are missing.
# Safe to run any number of times; it downloads nothing but these packages from the configured apt sources.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config
  libopenmpi-dev openmpi-bin libhdf5-openmpi-dev
  libboost-program-options-dev libopenblas-dev liblapacke-dev
  nlohmann-json3-dev libgtest-dev googletest zlib1g-dev
  python3 python3-numpy python3-h5py
)

say() { echo "install_deps: $*"; }
# dpkg -s also succeeds for removed-but-configured packages; require the "install ok installed" state
installed() { dpkg -s "$1" 2>/dev/null | grep -q '^Status: install ok installed'; }

if ! command -v dpkg >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  say "dpkg/apt-get not found: this script supports Debian and Ubuntu; install the equivalent of: ${PACKAGES[*]}" >&2
  exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
  installed "$p" || missing+=("$p")
done

if [ "${#missing[@]}" -eq 0 ]; then
  say "all ${#PACKAGES[@]} packages present"
  exit 0
fi
say "missing: ${missing[*]}"

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo)
else
  say "not root and sudo is not available: run as root: apt-get install ${missing[*]}" >&2
  exit 1
fi

say "apt-get update"
"${SUDO[@]}" apt-get update -qq
say "apt-get install ${missing[*]}"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null

for p in "${missing[@]}"; do
  if ! installed "$p"; then
    say "package $p is still not installed after apt-get install" >&2
    exit 1
  fi
done
say "installed ${#missing[@]} packages"
