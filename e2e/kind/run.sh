#!/usr/bin/env bash
# Ambit on a kind cluster (Docker): create the two-node cluster of kind-config.yaml, then run the checks of
# e2e/cluster/mesh.sh against it (build the images with scripts/build-images.sh, `kind load image-archive` them,
# install with the overlay e2e/cluster/overlay/, traffic between the nodes through ztunnel, uninstall), then
# delete the cluster (KIND_KEEP=1 keeps it).
#   e2e/kind/run.sh
# Needs docker (with a running engine), kind, kubectl, a Rust toolchain, python3, jq and a static /bin/busybox
# (the test pods' image). It cannot run on the project's build machines: they have no Docker engine. See README.md.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
export KIND_CLUSTER="${KIND_CLUSTER:-ambit}"

for c in docker kind kubectl; do command -v "$c" >/dev/null || { echo "run.sh: missing $c" >&2; exit 1; }; done
docker info >/dev/null 2>&1 || { echo "run.sh: no Docker engine (docker info fails)" >&2; exit 1; }

kubeconfig="$(mktemp /tmp/ambit-kind-kubeconfig.XXXXXX)"
cleanup() {
  local rc=$?
  if [[ "${KIND_KEEP:-0}" != 1 ]]; then kind delete cluster --name "$KIND_CLUSTER" || rc=1; fi
  rm -f "$kubeconfig"
  exit "$rc"
}
trap cleanup EXIT

kind create cluster --name "$KIND_CLUSTER" --config "$here/kind-config.yaml" --kubeconfig "$kubeconfig" --wait 120s
"$repo/e2e/cluster/mesh.sh" kind "$kubeconfig"
