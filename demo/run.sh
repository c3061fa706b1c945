#!/usr/bin/env bash
# Sets up the embedded default on this Debian machine (file:// store, local registry, local
# Docker engine) and deploys a sample app through wunderproxy, twice.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
exec python3 demo/deploy.py "$@"
