#!/usr/bin/env bash
# Runs every test: unit tests, in-process tests and the network-namespace lab
# (real netns, nftables, TLS, the real ztunnel binary). Needs root; with
# CI set, tests that need root fail instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh

export CARGO_TERM_COLOR=never
# The lab starts the ztunnel binary: build it before the tests run.
cargo build --release --workspace --bins
cargo test --release --workspace --no-fail-fast -- --test-threads="${AMBIT_TEST_THREADS:-2}"
