#!/usr/bin/env bash
# Create (once) and activate the magnet-st virtual environment, then run the given command in it.
#   bash scripts/env.sh magnet demo
#   bash scripts/env.sh pytest
# The environment lives outside the clone, under ${MAGNET_ST_ENV_ROOT:-~/.cache/magnet-st},
# keyed by the requirement files, so every clone with the same requirements reuses it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
caller="$PWD"
cd "$here"
python="${PYTHON:-python3}"
# Key: the Python version, the pinned dev requirements and pyproject's dependency lists only,
# so that editing other parts of pyproject.toml does not rebuild the environment.
key="$("$python" - <<'PY'
import hashlib, json, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = [project.get("dependencies", []), project.get("optional-dependencies", {})]
text = json.dumps([sys.version_info[:2], deps, open(".ci/requirements-dev.txt").read()], sort_keys=True)
print(hashlib.sha256(text.encode()).hexdigest()[:16])
PY
)"
root="${MAGNET_ST_ENV_ROOT:-$HOME/.cache/magnet-st}"
venv="$root/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "magnet-st: creating the environment in $venv (first run only; several minutes)" >&2
  rm -rf "$venv"
  mkdir -p "$root"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q -r .ci/requirements-dev.txt >&2
  "$venv/bin/pip" install -q -e ".[dev,offline-encoder]" >&2
  touch "$venv/.complete"
fi
# The environment is shared between clones: point its editable install at this one.
if ! "$venv/bin/python" - "$here/src" <<'PY' >/dev/null 2>&1
import sys, magnet_st, pathlib
sys.exit(0 if pathlib.Path(magnet_st.__file__).resolve().is_relative_to(pathlib.Path(sys.argv[1]).resolve()) else 1)
PY
then
  "$venv/bin/pip" install -q --no-deps --no-build-isolation -e . >&2
fi
export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
[ $# -gt 0 ] || set -- bash
cd "$caller"
exec "$@"
