#!/usr/bin/env bash
# Everything the tests need on a fresh Debian/Ubuntu machine, then the tests (the README's
# second Quickstart command; .ci/run calls it too):
#   1. the system packages of .ci/system-packages (headless Chromium and its driver, for the
#      report's browser test) with apt-get, as root or through sudo, only when one is missing;
#   2. the virtual environment .venv with the package and its test extras (pip only when
#      pyproject.toml or the Python changed since the last install);
#   3. .venv/bin/python -m pytest with this script's arguments, e.g. scripts/test.sh -m "not slow".
# Idempotent: once everything is there, it goes straight to the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
me="scripts/test.sh"

# 1. system packages
missing=()
while read -r package file _; do
    case "$package" in "" | "#"*) continue ;; esac
    [ -e "$file" ] || missing+=("$package")
done < .ci/system-packages
# Debian's python3 makes virtual environments only with python3-venv (ensurepip)
[ -x .venv/bin/python ] || python3 -c "import ensurepip" 2>/dev/null || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        sudo=()
    elif command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        echo "$me: missing system packages ${missing[*]}: as root, run apt-get update && apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "$me: missing system packages ${missing[*]} and no apt-get: install them with this system's package manager" >&2
        exit 1
    fi
    echo "$me: installing ${missing[*]} with apt-get" >&2
    apt=(${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq)
    "${apt[@]}" update
    "${apt[@]}" install -y --no-install-recommends "${missing[@]}" >/dev/null
    while read -r package file _; do
        case "$package" in "" | "#"*) continue ;; esac
        if [ ! -e "$file" ]; then
            echo "$me: $file still missing after apt-get install $package" >&2
            exit 1
        fi
    done < .ci/system-packages
fi

# 2. the Python environment
stamp=.venv/.test-install
want="$(python3 -c 'import sys; print(sys.version)' | head -n 1) $(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv || { rm -rf .venv; exit 1; }
    fi
    echo "$me: installing the package and its test extras into .venv (minutes on a fresh machine)" >&2
    # pip compiles every installed module on one core (~37 s here); compileall on every core is
    # faster, and some bytecode must be written: PYTHONDONTWRITEBYTECODE=1 machines never cache it
    .venv/bin/pip install -q --no-compile -e '.[test]'
    .venv/bin/python -m compileall -q -j 0 .venv/lib > /dev/null 2>&1 || true  # some vendored test files are not Python 3
    echo "$want" > "$stamp"
fi

# 3. the tests
exec .venv/bin/python -m pytest "$@"
