#!/usr/bin/env bash
# Sets up and runs the local demo mesh: the controller (xDS + CA), two nodes
# and four pods made of network namespaces, a ztunnel per node, traffic
# through HBONE with mTLS, and one AuthorizationPolicy denying a pod.
# Runs until Ctrl-C (or for the number of seconds given), then cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
cargo build --release -p ztunnel -p ambit-controller -p ambit-e2e --bins
exec target/release/demo "$@"
