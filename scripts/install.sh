#!/usr/bin/env bash
# Installs gpuconv and what it needs into the project's virtual environment, .venv (or
# $GPUCONV_VENV): the package (editable) with the extras named in $1 (comma-separated), CuPy for
# the driver's CUDA version when an NVIDIA driver is present, and the Fashion-MNIST files from
# Debian's package where apt-get can be used. A virtual environment works on distributions whose
# Python refuses `pip install` outside one (PEP 668). A later run with the same pyproject.toml and
# extras finds them installed (a stamp in the environment records what was) and runs no pip.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${GPUCONV_VENV:-.venv}"
python="$venv/bin/python"
extras="${1:-}"

say() { echo "install: $*" >&2; }

as_root_apt() {  # apt-get install "$@" when we are root and have apt-get; false otherwise
    command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] || return 1
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "$@" >/dev/null
}

venv_works() { [ -x "$python" ] && "$python" -m pip --version >/dev/null 2>&1; }

if ! venv_works; then
    rm -rf "$venv"  # a half-made one (e.g. `python3 -m venv` without ensurepip leaves one without pip)
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        rm -rf "$venv"
        say "python3 cannot create a virtual environment; installing python3-venv"
        if ! as_root_apt python3-venv || ! python3 -m venv "$venv"; then
            say "could not create $venv: install python3-venv (e.g. 'sudo apt-get install python3-venv') and run again"
            exit 1
        fi
    fi
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    cuda_major=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n1)
    if [ "${cuda_major:-0}" -ge 13 ]; then
        extras="${extras:+$extras,}cuda13"
    elif [ "${cuda_major:-0}" -ge 12 ]; then
        extras="${extras:+$extras,}cuda12"
    else
        say "the NVIDIA driver supports CUDA '${cuda_major:-unknown}', older than the 12 CuPy needs: no CuPy, the GPU stays unused"
    fi
fi

# The stamp: a hash of what the install depends on, then the extras installed with it. A run
# that asks for no extra beyond those (e.g. train.sh after test.sh) has nothing to do.
stamp="$venv/.gpuconv-installed"
setup="$( { cat pyproject.toml; echo "repo=$PWD"; "$python" --version; } 2>&1 | sha256sum | cut -d' ' -f1)"
installed=""
[ -f "$stamp" ] && [ "$(head -n1 "$stamp")" = "$setup" ] && installed="$(sed -n 2p "$stamp")"
missing=""
for extra in ${extras//,/ }; do
    case ",$installed," in *",$extra,"*) ;; *) missing="${missing:+$missing,}$extra" ;; esac
done
if [ -f "$stamp" ] && [ "$(head -n1 "$stamp")" = "$setup" ] && [ -z "$missing" ]; then
    exit 0
fi
extras="$(printf '%s\n' ${installed//,/ } ${extras//,/ } | sort -u | paste -sd, -)"
say "installing gpuconv${extras:+[$extras]} into $venv"
rm -f "$stamp"
"$python" -m pip install -q -e ".${extras:+[$extras]}"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    as_root_apt dataset-fashion-mnist \
        || say "note: could not install dataset-fashion-mnist; gpuconv will look elsewhere or download"
fi
printf '%s\n%s\n' "$setup" "$extras" > "$stamp"
