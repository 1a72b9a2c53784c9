#!/usr/bin/env bash
# JupyterLab on the labs, as `make lab` starts it and tests/test_jupyterlab.py drives it: on the
# loopback only, with a token (JUPYTER_TOKEN, else a random one in the URL it prints), the
# course's settings (jupyterlab/overrides.json: no news pop-up, no update check) and a fresh
# folder for the session's own settings and workspaces, removed when the server stops.
# Extra arguments go to `jupyter lab` (e.g. --port 8899 --no-browser).
set -euo pipefail
cd "$(dirname "$0")/.."
session=$(mktemp -d -t cnlab-jupyterlab-XXXXXX)
trap 'rm -rf "$session"' EXIT
export JUPYTERLAB_SETTINGS_DIR=${JUPYTERLAB_SETTINGS_DIR:-$session/user-settings}
export JUPYTERLAB_WORKSPACES_DIR=${JUPYTERLAB_WORKSPACES_DIR:-$session/workspaces}
root=()
[ "$(id -u)" -eq 0 ] && root=(--allow-root)   # the labs create namespaces and cgroups
.venv/bin/jupyter lab labs --ip 127.0.0.1 --LabApp.app_settings_dir="$PWD/jupyterlab" "${root[@]}" "$@"
