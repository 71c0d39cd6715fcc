#!/usr/bin/env bash
# The Gateway API conformance suite's mesh profiles (MESH-HTTP, MESH-GRPC) against Ambit on the project's two-node
# kubelet cluster (e2e/cluster/), the routes handled by Ambit's waypoint:
#   e2e/gateway-conformance/run.sh DIR              Ambit installed (report: DIR/report-mesh.yaml)
#   e2e/gateway-conformance/run.sh --no-mesh DIR    the negative control: the same run with no mesh installed
#                                                   (report: DIR/report-no-mesh.yaml)
# DIR is an e2e/cluster directory: a cluster is brought up there with cluster DNS (AMBIT_CLUSTER_DNS=1) and torn
# down at the end, unless DIR already holds one (up with AMBIT_CLUSTER_DNS=1); that one is left up, with Ambit
# uninstalled and the suite's namespaces deleted. Prints each test's result and the time of each phase.
#
# Steps: build.sh (cached); cluster; the echo image on both nodes; the Gateway API CRDs of the suite's release;
# [mesh] scripts/build-images.sh, Ambit installed with `kubectl apply --server-side -k overlay/` (e2e/cluster/overlay/
# less its minimal Gateway API CRDs), the waits of e2e/cluster/mesh.sh, the suite's two namespaces made beforehand,
# each with a waypoint Gateway (class istio-waypoint) that the controller deploys; then the suite, with its
# namespaces labelled istio.io/dataplane-mode=ambient and istio.io/use-waypoint=waypoint (--namespace-labels: the
# suite overwrites the labels of the namespaces it applies), RequiredConsecutiveSuccesses 20 (with the default 3,
# kube-proxy's random choice passes tests by luck), the features Ambit's waypoint claims.
#
# Environment:
#   GC_PROFILES=MESH-HTTP,MESH-GRPC     --conformance-profiles
#   GC_RUN_TEST=NAME                    --run-test (one test)
#   GC_SKIP_TESTS=A,B                   --skip-tests
#   GC_SUPPORTED_FEATURES=...           --supported-features (default: below)
#   GC_TEST_TIMEOUT=60m                 the test binary's -test.timeout
#   GC_IMPLEMENTATION_URL=...           the report's implementation URL (required by the suite; a placeholder)
#   AMBIT_NO_CARGO_BUILD=1              passed to scripts/build-images.sh (use target/release as it is)
# Exit status: the suite's (0 when every test that ran passed), or 1 when a step before it failed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$GC_REPO/e2e/cluster/lib.sh"

mode=mesh
if [[ "${1:-}" == --no-mesh ]]; then mode=no-mesh; shift; fi
[[ $# -eq 1 ]] || gc_die "usage: $0 [--no-mesh] DIR"
set_cluster_dir "$1"

PROFILES="${GC_PROFILES:-MESH-HTTP,MESH-GRPC}"
# What Ambit's waypoint implements (README.md, docs/architecture.md): GAMMA HTTPRoute/GRPCRoute on a Service
# (port/sectionName), path/header/query/method matching, named rules, request/response/backend header modifiers,
# redirects (scheme, host, port, path, status), path rewrite, weighted backends, consumer routes (a route in the
# client's namespace on a Service of another, applied to that namespace's clients only).
FEATURES="${GC_SUPPORTED_FEATURES:-Mesh,MeshConsumerRoute,HTTPRoute,GRPCRoute,HTTPRouteResponseHeaderModification,HTTPRouteParentRefPort,\
HTTPRoute303RedirectStatusCode,HTTPRoute307RedirectStatusCode,HTTPRoute308RedirectStatusCode,MeshClusterIPMatching,\
MeshHTTPRouteRewritePath,MeshHTTPRouteSchemeRedirect,MeshHTTPRouteRedirectPort,MeshHTTPRouteRedirectPath,\
MeshHTTPRouteBackendRequestHeaderModification,MeshHTTPRouteQueryParamMatching,MeshHTTPRouteNamedRouteRule}"
# The report's implementation URL, which the suite requires. The project has no public page yet: a placeholder in
# the ghcr.io/ambit-mesh namespace that the manifests' image names use.
URL="${GC_IMPLEMENTATION_URL:-https://github.com/ambit-mesh/ambit}"
NAMESPACES=(gateway-conformance-mesh gateway-conformance-mesh-consumer)   # the suite's mesh manifests
OVERLAY="$GC_DIR/overlay"
WAIT=120
REPORT="$CLUSTER_DIR/report-$mode.yaml"
SUITE_LOG="$CLUSTER_DIR/conformance-$mode.log"

t0=$SECONDS
phase_t=$SECONDS
phases=()
phase() {
  phases+=("${phase_name:-setup} $((SECONDS - phase_t))s")
  gc_log "---- $1 (${phase_name:-setup} took $((SECONDS - phase_t))s)"
  phase_name="$1" phase_t=$SECONDS
}

# ---------------------------------------------------------------- build, cluster

phase build
BUILD="$("$GC_DIR/build.sh")"
gc_log "suite, CoreDNS and echo from $BUILD"

phase "cluster up"
brought_up=0
if [[ -f "$ENV_FILE" ]]; then
  [[ -n "$(env_get CLUSTER_DNS)" ]] || gc_die "the cluster in $CLUSTER_DIR has no cluster DNS (bring it up with AMBIT_CLUSTER_DNS=1)"
  gc_log "using the cluster in $CLUSTER_DIR"
else
  AMBIT_CLUSTER_DNS=1 AMBIT_COREDNS_TAR="$BUILD/coredns.tar" "$GC_REPO/e2e/cluster/up.sh" "$CLUSTER_DIR" >/dev/null
  brought_up=1
fi
KUBE_BIN="$(env_get KUBE_BIN)"
export KUBECONFIG="$CLUSTER_DIR/kubeconfig"
k() { "$KUBE_BIN/kubectl" "$@"; }
on_node() { local n="$1"; shift; nsenter --net="/run/netns/$(node_netns "$n")" --mount="$(node_mntns_pin "$n")" -- "$@"; }
load_images() { local n f; for n in "${NODES[@]}"; do for f in "$@"; do
  ctr --address "$(containerd_sock "$n")" -n k8s.io images import "$f" >/dev/null; done; done; }

installed=0
finish() {
  local rc=$? ns
  trap - EXIT
  if ((brought_up)); then
    phase "cluster down"
    "$GC_REPO/e2e/cluster/down.sh" "$CLUSTER_DIR" >/dev/null 2>"$CLUSTER_DIR/down-$mode.log" \
      || { gc_log "error: down.sh failed: $(tail -n 5 "$CLUSTER_DIR/down-$mode.log")"; rc=1; }
  else
    # A cluster we did not bring up: leave it as it was (the suite's namespaces gone, Ambit uninstalled).
    phase cleanup
    for ns in "${NAMESPACES[@]}"; do k delete namespace "$ns" --ignore-not-found --wait=false >/dev/null || true; done
    for ns in "${NAMESPACES[@]}"; do k wait --for=delete "namespace/$ns" --timeout=180s >/dev/null 2>&1 || true; done
    if ((installed)); then
      k delete -k "$OVERLAY" --ignore-not-found >/dev/null || rc=1
      k wait --for=delete namespace/ambit-system --timeout=120s >/dev/null 2>&1 || true
    fi
  fi
  phases+=("${phase_name} $((SECONDS - phase_t))s")
  gc_log "phases: $(IFS=,; echo "${phases[*]}" | sed 's/,/, /g')"
  gc_log "in all $((SECONDS - t0))s; exit $rc"
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

for ns in "${NAMESPACES[@]}"; do
  [[ -z "$(k get namespace "$ns" -o name --ignore-not-found)" ]] \
    || gc_die "namespace $ns exists (an earlier run's, still terminating?): wait until it is gone"
done
if [[ $mode == no-mesh ]]; then
  [[ -z "$(k get namespace ambit-system -o name --ignore-not-found)" ]] || gc_die "--no-mesh: Ambit is installed"
fi

# ---------------------------------------------------------------- images, CRDs

phase "images and CRDs"
load_images "$BUILD/echo.tar"
gc_log "loaded $GC_ECHO_IMAGE on ${NODES[*]}"
k apply --server-side --force-conflicts -f "$BUILD/crds-standard.yaml" >/dev/null
k wait --for=condition=Established --timeout=60s \
  $(k get crd -o name | grep 'gateway\.networking\.k8s\.io$') >/dev/null
gc_log "Gateway API CRDs $(gc_suite_version) (standard) Established"

# ---------------------------------------------------------------- Ambit (mesh mode)

source "$GC_REPO/e2e/cluster/ambit.sh"   # the checks of e2e/cluster/mesh.sh
must() { local what="$1"; shift; if wait_until "$what" "$@"; then gc_log "ok: $what"; else gc_die "$what"; fi; }

if [[ $mode == mesh ]]; then
  phase "Ambit images"
  mkdir -p "$CLUSTER_DIR/images"
  "$GC_REPO/scripts/build-images.sh" "$CLUSTER_DIR/images"
  load_images "$CLUSTER_DIR"/images/{controller,ztunnel,node-agent,waypoint}.tar
  set_pod_cidrs   # no node IPAM on this cluster (e2e/cluster/ambit.sh)

  phase "Ambit install"
  k apply --server-side -k "$GC_REPO/manifests/crds" >/dev/null
  k wait --for=condition=Established crd -l app.kubernetes.io/part-of=ambit --timeout=60s >/dev/null
  installed=1
  k apply --server-side -k "$OVERLAY" >/dev/null
  gc_log "kubectl apply --server-side -k $OVERLAY"
  must "controller Deployment Available" "$WAIT" controller_available
  for n in "${NODES[@]}"; do must "$n: ztunnel Running and synced (xds: synced)" "$WAIT" ztunnel_synced "$n"; done
  must "DaemonSet ambit-node 2/2 ready" "$WAIT" rolled_out ambit-node
  must "DaemonSet ztunnel 2/2 ready" 30 rolled_out ztunnel
  for n in "${NODES[@]}"; do must "$n: ambit-cni installed and in the conflist" 30 plugin_installed "$n"; done

  # The suite's namespaces, each with its waypoint, before the suite: the suite adds its labels to them (the same
  # ones) and applies its Deployments and Services there; the Services use the waypoint through the namespace's
  # istio.io/use-waypoint label.
  phase "waypoints"
  for ns in "${NAMESPACES[@]}"; do
    k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $ns
  labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: $ns}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
EOF
  done
  for ns in "${NAMESPACES[@]}"; do must "$ns: waypoint deployed by the controller, Available" "$WAIT" waypoint_available "$ns"; done
fi

# ---------------------------------------------------------------- the suite

phase "suite ($mode)"
args=(
  -test.v -test.timeout="${GC_TEST_TIMEOUT:-60m}"
  --conformance-profiles="$PROFILES"
  --supported-features="$FEATURES"
  --namespace-labels=istio.io/dataplane-mode=ambient,istio.io/use-waypoint=waypoint
  --timeout-config-overrides=RequiredConsecutiveSuccesses:20
  --report-output="$REPORT"
  --organization=ambit --project=ambit --url="$URL"
  --version="$(git -C "$GC_REPO" describe --always --dirty 2>/dev/null || echo dev)$([[ $mode == mesh ]] || echo "+no-mesh")"
  --contact=dev@ambit.local
)
[[ -z "${GC_RUN_TEST:-}" ]] || args+=(--run-test="$GC_RUN_TEST")
[[ -z "${GC_SKIP_TESTS:-}" ]] || args+=(--skip-tests="$GC_SKIP_TESTS")
gc_log "$BUILD/conformance.test ${args[*]}"
rm -f "$REPORT"
suite_rc=0
(cd "$CLUSTER_DIR" && "$BUILD/conformance.test" "${args[@]}") >"$SUITE_LOG" 2>&1 || suite_rc=$?
gc_log "suite exit $suite_rc after $((SECONDS - phase_t))s; log $SUITE_LOG, report $REPORT"
if [[ $mode == mesh ]]; then
  # What explains failures, kept before the uninstall: the controller's log (rejected routes, warnings) and each
  # waypoint's (its access log names the route a request took: route_name).
  k logs -n ambit-system deploy/ambit-controller >"$CLUSTER_DIR/controller-$mode.log" 2>&1 || true
  for ns in "${NAMESPACES[@]}"; do k logs -n "$ns" deploy/waypoint >"$CLUSTER_DIR/waypoint-$ns.log" 2>&1 || true; done
fi

# Per test: result and time (from its first to its last log line), and the closing count.
"$GC_DIR/summary.py" "$SUITE_LOG" | tee "$CLUSTER_DIR/summary-$mode.txt"
[[ -s "$REPORT" ]] || { gc_log "error: no report written"; suite_rc=1; }
exit "$suite_rc"
