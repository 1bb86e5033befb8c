#!/usr/bin/env bash
# Run HERE (a machine with PyPI), not on the GPU machine: downloads the wheels the GPU bench needs that the GPU
# machine's image lacks into bench/gpu/wheels/ (git-ignored), pinned as constraints.txt pins them, for the GPU
# machine's Python (3.12, x86-64 Linux), and prints their total against the 64 MiB the device tool carries.
#
# What the GPU image already has (see the device notes' package list): torch, transformers, peft, accelerate,
# triton, numpy, pandas, pyarrow, xxhash, fsspec, pyyaml, requests, tqdm, jinja2, click, six, filelock, psutil.
# What it lacks, by need, in the order they are dropped last:
#   training (train_adapter): bitsandbytes (CUDA 4-bit, ~43 MB), trl, datasets with dill and multiprocess
#   config schema (pydantic models): pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions
#   data (the demo's rows are checked with pandera): pandera, typeguard, typing-inspect, mypy-extensions
#   liger: liger-kernel (pure Python and Triton)
#   dagster: the slice `import dagster; dagster.Config` loads (the schema's base class); without it the bench
#            loads the schema on a stand-in base class (bench_env.py)
# A group that would take the total past the budget is left out, and said so.
#
# usage: bash bench/gpu/fetch_wheels.sh       env: PYTHON_VERSION (3.12), WHEEL_DIR, BUDGET_MIB (62)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
dest=${WHEEL_DIR:-$here/wheels}
python_version=${PYTHON_VERSION:-3.12}
# 64 MiB carried in all, the checkout itself (~1 MiB) included: keep 2 MiB for it.
budget_bytes=$(( ${BUDGET_MIB:-62} * 1024 * 1024 ))
pip=("$repo/.venv/bin/python" -m pip)
[ -x "$repo/.venv/bin/python" ] || pip=(python3 -m pip)

LIGER_VERSION=0.8.5  # not in constraints.txt: the project does not depend on it
training=(bitsandbytes trl datasets dill multiprocess)
schema=(pydantic pydantic_core annotated-types typing-inspection typing_extensions)
data=(pandera typeguard typing-inspect mypy_extensions)
liger=("liger-kernel==$LIGER_VERSION")
dagster=(dagster dagster-shared dagster-pipes coloredlogs humanfriendly docstring_parser pytz toposort)

pinned() {  # NAME -> NAME==VERSION from constraints.txt (names compared as pip does: case, - _ . alike)
  local pattern
  pattern=$(echo "$1" | sed 's/[-_.]/[-_.]/g')
  grep -iE "^${pattern}==" "$repo/constraints.txt" | head -1 || true
}

total_bytes() { du -cb "$dest"/*.whl 2>/dev/null | tail -1 | cut -f1; }

fetch_group() {  # GROUP-NAME SPEC...: download, or remove again if the total would pass the budget
  local group=$1; shift
  local before specs=() spec
  before=$(ls "$dest"/*.whl 2>/dev/null || true)
  for spec in "$@"; do
    [[ $spec == *==* ]] || spec=$(pinned "$spec")
    [ -n "$spec" ] || { echo "no pin for $1 in constraints.txt" >&2; exit 1; }
    specs+=("$spec")
  done
  "${pip[@]}" download --quiet --no-deps --only-binary=:all: --implementation cp --python-version "$python_version" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$dest" "${specs[@]}" 2>&1 | grep -v "^WARNING: Location 'file://" || true
  for spec in "${specs[@]}"; do  # the grep hides pip's exit status: check each wheel arrived
    local name_pattern
    name_pattern=$(echo "${spec%%==*}" | sed 's/[-_.]/[-_.]/g')
    ls "$dest" | grep -qiE "^${name_pattern}-${spec##*==}-" || { echo "missing wheel for $spec" >&2; exit 1; }
  done
  if [ "$(total_bytes)" -gt "$budget_bytes" ]; then
    for wheel in "$dest"/*.whl; do
      grep -qxF "$wheel" <<<"$before" || rm -f "$wheel"
    done
    echo "left out $group: it would take the wheels past $(( budget_bytes / 1024 / 1024 )) MiB"
  fi
}

rm -rf "$dest"
mkdir -p "$dest"
fetch_group training "${training[@]}"
fetch_group schema "${schema[@]}"
fetch_group data "${data[@]}"
fetch_group liger "${liger[@]}"
fetch_group dagster "${dagster[@]}"

echo "wheels in $dest for CPython $python_version (x86-64 Linux):"
ls -l "$dest" | awk 'NR > 1 { printf "  %10d  %s\n", $5, $9 }'
total=$(total_bytes)
echo "total: $total bytes ($(awk -v b="$total" 'BEGIN { printf "%.1f", b / 1048576 }') MiB of the 64 MiB the device tool carries)"
