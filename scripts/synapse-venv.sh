# Sourced by the scripts that run a real Synapse (scripts/synapse-bench.sh, tests/interop/):
# makes sure a virtualenv outside the repository holds matrix-synapse $SYNAPSE_VERSION, installing
# it once from PyPI, and sets VPY to the virtualenv's python.
# Reads SYNAPSE_VENV, SYNAPSE_VERSION and PYTHON (an interpreter >= 3.10 to create the venv with).
synapse_venv() {
  if [ ! -x "$SYNAPSE_VENV/bin/python" ]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
      || { echo "Synapse $SYNAPSE_VERSION needs Python >= 3.10 (set PYTHON=...)" >&2; return 1; }
    echo "creating virtualenv $SYNAPSE_VENV" >&2
    "$PYTHON" -m venv "$SYNAPSE_VENV" \
      || { echo "python3 -m venv failed (on Debian: apt-get install python3-venv)" >&2; return 1; }
  fi
  VPY="$SYNAPSE_VENV/bin/python"
  local installed
  installed="$("$VPY" -c 'import synapse; print(synapse.__version__)' 2>/dev/null || true)"
  if [ "$installed" != "$SYNAPSE_VERSION" ]; then
    echo "installing matrix-synapse==$SYNAPSE_VERSION into $SYNAPSE_VENV (was: ${installed:-none})" >&2
    "$VPY" -m pip install --quiet --disable-pip-version-check "matrix-synapse==$SYNAPSE_VERSION"
  fi
}
