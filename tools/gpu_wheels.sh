#!/usr/bin/env bash
# Fill .wheels/ (ignored by git) with what tools/gpu_first_run.sh installs on a GPU machine that has torch and
# transformers but not IPython or torchao: the versions installed here (requirements.txt pins them), as wheels for
# CPython $PYVER (default 3.12) on x86_64 Linux. Run it where the package index is reachable; then carry .wheels
# to the GPU machine beside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
pins=$(python3 - <<'PY'
from importlib.metadata import version
names = ("torchao ipython traitlets jedi parso prompt_toolkit wcwidth pexpect ptyprocess stack_data executing asttokens "
         "pure_eval decorator matplotlib-inline backcall pickleshare").split()
print(" ".join(f"{name}=={version(name)}" for name in names))
PY
)
rm -rf .wheels
# shellcheck disable=SC2086  # one argument per pin
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d .wheels $pins
ls .wheels
du -sh .wheels
