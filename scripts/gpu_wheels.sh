#!/usr/bin/env bash
# Prepare what a GPU machine without internet access needs for benchmarks/run_gpu_perf.sh: the wheels its
# image lacks or has in other versions (transformers 5.23.0, tokenizers 0.23.3 and peft 0.21.2 as pinned here, and
# the regex that transformers 5.23 checks for at import; hydra-core, omegaconf and antlr4, which it lacks; its torch,
# lightning, accelerate and numpy are used as they are) into .whl/, and
# the Beauty data into data/beauty (both git-ignored; copy them along with the repository). Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DATA_FROM=${DATA_FROM:-../shared/data/beauty}
mkdir -p .whl
# the GPU image runs CPython 3.12 on x86-64
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    transformers==5.23.0 tokenizers==0.23.3 peft==0.21.2 regex==2026.11.19 hydra-core==1.3.8 omegaconf==2.3.1
# antlr4-python3-runtime 4.9.3 (hydra's parser runtime) is published as an sdist only: build its pure-Python wheel
ls .whl/antlr4_python3_runtime-4.9.3-*.whl > /dev/null 2>&1 \
    || "$PY" -m pip wheel -q --no-deps --no-binary=:all: -w .whl antlr4-python3-runtime==4.9.3
if [ ! -f data/beauty/testing_dict.npy ]; then
  mkdir -p data/beauty
  cp "$DATA_FROM"/*.npy "$DATA_FROM"/*.json data/beauty/
fi
ls -la .whl data/beauty
du -sh .whl data/beauty
