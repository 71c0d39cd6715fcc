#!/usr/bin/env bash
# Runs every test: unit tests, in-process tests (real TLS, gRPC, ZDS
# sockets), the network-namespace lab (real netns, nftables, the real
# ztunnel and controller binaries), the smoke test of the real
# kube-apiserver + etcd built for the controller's Kubernetes tests, a
# real two-node kubelet cluster with Ambit installed on it, and the Gateway
# API conformance suite's mesh profiles against Ambit on that cluster.
# Needs root; with CI set, tests that need root fail instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh

export CARGO_TERM_COLOR=never
cargo fmt --all -- --check
# The lab starts the ztunnel and controller binaries: build them first.
cargo build --release --workspace --bins
cargo test --release --workspace --no-fail-fast -- --test-threads="${AMBIT_TEST_THREADS:-2}"
# The L4 lab suites again with eBPF capture instead of nftables: same tests, same assertions.
AMBIT_LAB_CAPTURE=ebpf cargo test --release --workspace --test mesh_l4 --test mesh_errors --test mesh_policy_change \
  --test ztunnel_restart -- --test-threads="${AMBIT_TEST_THREADS:-2}"

# A real Kubernetes API server for the controller's tests: built once from
# the published Go modules (about 10 minutes cold, cached outside the clone).
e2e/kube/smoke.sh

# A real two-node Kubernetes cluster (kubelet + containerd per node, the
# reference CNI plugins), up and down, leaving the machine as it was.
e2e/cluster/smoke.sh

# Ambit on that cluster, as a user installs it: the images (from the binaries
# built above), the manifests, the node agent and CNI plugin; capture at pod
# start, mTLS, probes under STRICT, running pods enrolled, an L4 policy, a
# waypoint with an HTTPRoute and an L7 policy, ztunnel and agent restarts, a
# rolling ztunnel restart under load, and an uninstall that leaves the nodes
# as they were.
AMBIT_NO_CARGO_BUILD=1 e2e/cluster/mesh.sh cluster "$(mktemp -d /tmp/ambit-mesh.XXXXXX)"

# The Gateway API conformance suite's mesh profiles (MESH-HTTP, MESH-GRPC; built once from its Go modules, cached
# in /var/cache/ambit/gateway-conformance) against Ambit's waypoint on the same two-node cluster, with CoreDNS:
# every test of a feature Ambit claims must pass (e2e/gateway-conformance/README.md).
AMBIT_NO_CARGO_BUILD=1 e2e/gateway-conformance/run.sh "$(mktemp -d /tmp/ambit-gc.XXXXXX)"
