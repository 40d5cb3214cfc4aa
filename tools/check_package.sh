#!/usr/bin/env bash
# Build tf_moe's wheel and sdist and test them as a user would install them (called by .ci/run;
# runs alone too: tools/check_package.sh). About 1-2 minutes on 2 CPU cores, network for PyPI
# (build, twine and the build backend's setuptools; TensorFlow comes from the system site).
#
#  1. `python -m build`: the sdist, then the wheel built from that sdist; `twine check --strict`.
#  2. The wheel holds every file git tracks under tf_moe/ and no other top-level package; the sdist
#     holds every tracked file under tf_moe/, tests/, notebooks/, benchmarks/lm.py and the top-level
#     metadata.
#  3. The wheel in a fresh venv outside the checkout (--system-site-packages, so TensorFlow is not
#     downloaded again; the venv's own tf_moe shadows an editable install of the system site):
#     from another folder, tools/smoke_test.py and `python -m tf_moe.demo` run on it.
#  4. The sdist installs (--no-deps) into a second venv and imports.
# Everything is written under a temporary directory, removed at the end
# (TF_MOE_KEEP_TMP=1 keeps it).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
WORK="$(mktemp -d "${TMPDIR:-/tmp}/tf_moe_package.XXXXXX")"
case "$WORK/" in "$ROOT"/*) echo "check_package: $WORK is inside the checkout" >&2; exit 1;; esac
cleanup() { if [ "${TF_MOE_KEEP_TMP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
step() { printf '\n== %s (%ds)\n' "$1" "$SECONDS"; }

step "tools venv: build, twine"
"$PYTHON" -m venv "$WORK/tools"
"$WORK/tools/bin/pip" install -q build twine

step "python -m build"
"$WORK/tools/bin/python" -m build --outdir "$WORK/dist" "$ROOT" > "$WORK/build.log" 2>&1 \
    || { cat "$WORK/build.log"; exit 1; }
shopt -s nullglob
wheels=("$WORK"/dist/tf_moe-*.whl)
sdists=("$WORK"/dist/tf_moe-*.tar.gz)
shopt -u nullglob
[ "${#wheels[@]}" = 1 ] && [ "${#sdists[@]}" = 1 ] \
    || { echo "check_package: expected one wheel and one sdist in $WORK/dist" >&2; exit 1; }
wheel="${wheels[0]}"
sdist="${sdists[0]}"
ls -l "$WORK/dist"

step "twine check --strict"
"$WORK/tools/bin/twine" check --strict "$wheel" "$sdist"

step "contents of the wheel and the sdist"
if git -C "$ROOT" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
    git -C "$ROOT" ls-files -- tf_moe > "$WORK/package_files"
    git -C "$ROOT" ls-files -- tf_moe tests notebooks tools benchmarks/lm.py README.md LICENSE \
        CHANGELOG.md setup.cfg setup.py pyproject.toml MANIFEST.in > "$WORK/sdist_files"
else  # not a git checkout (e.g. an unpacked sdist): what is on disk
    (cd "$ROOT" && find tf_moe -type f ! -path '*__pycache__*' ! -name '*.py[cod]') \
        > "$WORK/package_files"
    cp "$WORK/package_files" "$WORK/sdist_files"
fi
"$WORK/tools/bin/python" - "$wheel" "$sdist" "$WORK/package_files" "$WORK/sdist_files" <<'EOF'
import sys, tarfile, zipfile

wheel, sdist, package_list, sdist_list = sys.argv[1:]
in_wheel = set(zipfile.ZipFile(wheel).namelist())
with tarfile.open(sdist) as tar:
    in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
problems = []
for name in open(package_list).read().split():
    if name not in in_wheel:
        problems.append(f"{name} is in tf_moe/ but not in the wheel "
                        "(a data file? list it under setup.cfg's [options.package_data])")
for name in open(sdist_list).read().split():
    if name not in in_sdist:
        problems.append(f"{name} is not in the sdist (see MANIFEST.in)")
top_level = {name.split("/", 1)[0] for name in in_wheel}
extra = sorted(name for name in top_level if name != "tf_moe" and not name.endswith(".dist-info"))
if extra:
    problems.append(f"the wheel installs more than tf_moe: {extra} (see setup.cfg's packages.find)")
if problems:
    sys.exit("check_package:\n  " + "\n  ".join(problems))
print(f"wheel: {len(in_wheel)} files, top level {sorted(top_level)}; "
      f"sdist: {len(in_sdist)} entries")
EOF

step "the wheel in a fresh venv"
"$PYTHON" -m venv --system-site-packages "$WORK/wheel-venv"
VPY="$WORK/wheel-venv/bin/python"
# --force-reinstall --no-deps: tf_moe itself goes into the venv even if the system site has the
# same version (editable); the second install then resolves its dependencies, already satisfied.
"$VPY" -m pip install -q --no-deps --force-reinstall "$wheel"
"$VPY" -m pip install -q "$wheel"
mkdir "$WORK/run"
cp "$ROOT/tools/smoke_test.py" "$WORK/run/"
cd "$WORK/run"
"$VPY" - "$WORK/wheel-venv" <<'EOF'
import pathlib, sys
import tf_moe
location = pathlib.Path(tf_moe.__file__).resolve()
venv = pathlib.Path(sys.argv[1]).resolve()
if not location.is_relative_to(venv):
    sys.exit(f"check_package: tf_moe imported from {location}, not from the venv {venv}")
print(f"tf_moe {tf_moe.__version__} imported from {location.parent}")
EOF

step "smoke test from the installed wheel"
"$VPY" smoke_test.py --not-under "$ROOT"

step "python -m tf_moe.demo from the installed wheel"
"$VPY" -m tf_moe.demo --epochs 1 --train 500

step "the sdist in a second venv (--no-deps)"
"$PYTHON" -m venv --system-site-packages "$WORK/sdist-venv"
SPY="$WORK/sdist-venv/bin/python"
"$SPY" -m pip install -q --no-deps --force-reinstall "$sdist"
"$SPY" -c "
import pathlib, sys, tf_moe
location = pathlib.Path(tf_moe.__file__).resolve()
assert location.is_relative_to(pathlib.Path(sys.prefix).resolve()), location
print(f'tf_moe {tf_moe.__version__} from the sdist, at {location.parent}:',
      tf_moe.MoELayer.__name__)
"

step "package checks passed"
