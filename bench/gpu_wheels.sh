#!/usr/bin/env bash
# Run HERE (the development machine, which reaches PyPI) before the GPU call: the GPU image has no liger-kernel and
# no cut-cross-entropy, and nothing can be fetched there. Downloads their wheels (pure Python; torch and triton,
# their only requirements, are in the image) into .whl/ of the checkout the device tool sends, ignored by git.
# Then call the device tool with carry [".whl"]; bench/gpu_check.sh installs them from there.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
mkdir -p .whl
for spec in "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1"; do
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl "$spec"
done
ls -l .whl
