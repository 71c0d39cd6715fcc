#!/usr/bin/env bash
# Ambit on a real cluster, end to end: build the images, load them on the nodes, install the manifests (the
# overlay e2e/cluster/overlay/, which only renames the images; on the project's cluster overlay-nodns/, which
# also stands in for the cluster DNS it lacks), wait for the controller, ztunnel and the node
# agent on both nodes, label a namespace ambient, run a server on one node and a client on the other, check that
# the client reaches the server through both ztunnels (their istio_tcp_connections_opened_total), then uninstall
# and check that the nodes' CNI conflists are as before and no pod network namespace keeps an `inet ambit` table.
#
#   e2e/cluster/mesh.sh cluster DIR          the two-node cluster of e2e/cluster/up.sh; brought up (and torn down
#                                            at the end) if DIR holds none, else used as it is and left up
#   e2e/cluster/mesh.sh kind KUBECONFIG      a kind cluster (e2e/kind/run.sh); KIND_CLUSTER names it (default ambit)
#
# Every check runs; each failure is reported with FAIL and the exit status is 1 if any failed. Nothing is skipped
# silently: a check that cannot pass yet (a binary not written yet, see e2e/cluster/README.md) fails.
# Environment: AMBIT_IMAGES_ALLOW_MISSING=1 is passed to scripts/build-images.sh (go on without an image whose
# binary is not in the workspace; the checks that need it then fail). MESH_IMAGES_DIR: where the image tars go.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { die "usage: $0 cluster DIR | $0 kind KUBECONFIG"; }
[[ $# -eq 2 ]] || usage
provider="$1"
t0=$SECONDS
NS=mesh-test                 # the ambient namespace of the test pods
OVERLAY="$CLUSTER_DIR_SRC/overlay"   # the cluster provider: overlay-nodns (no cluster DNS there)
WAIT="${MESH_WAIT_SECONDS:-90}"

failures=()
fail() { log "FAIL: $*"; failures+=("$*"); }
ok() { log "ok: $*"; }
# check WHAT CMD...: CMD once; ok or FAIL.
check() { local what="$1"; shift; if "$@"; then ok "$what"; else fail "$what"; fi; }
# eventually WHAT SECONDS CMD...: CMD until it succeeds or SECONDS pass.
eventually() { local what="$1"; if wait_until "$@"; then ok "$what"; else fail "$what"; fi; }

# ---------------------------------------------------------------- providers

# Each provider gives: KUBECTL (array), NODE_A (client) and NODE_B (server), load_images TAR..., on_node NODE CMD...
case "$provider" in
  cluster)
    set_cluster_dir "$2"
    brought_up=0
    if [[ ! -f "$ENV_FILE" ]]; then
      "$CLUSTER_DIR_SRC/up.sh" "$CLUSTER_DIR" >/dev/null
      brought_up=1
    fi
    KUBE_BIN="$(env_get KUBE_BIN)"
    KUBECTL=("$KUBE_BIN/kubectl" --kubeconfig="$CLUSTER_DIR/kubeconfig")
    NODE_A=node1 NODE_B=node2
    OVERLAY="$CLUSTER_DIR_SRC/overlay-nodns"
    TEST_IMAGE="$BUSYBOX_IMAGE"   # imported by up.sh
    load_images() {
      local n f
      for n in "${NODES[@]}"; do
        for f in "$@"; do ctr --address "$(containerd_sock "$n")" -n k8s.io images import "$f" >/dev/null; done
      done
    }
    on_node() { local n="$1"; shift; nsenter --net="/run/netns/$(node_netns "$n")" --mount="$(node_mntns_pin "$n")" -- "$@"; }
    finish_provider() { ((brought_up == 0)) || "$CLUSTER_DIR_SRC/down.sh" "$CLUSTER_DIR"; }
    IMAGES_DIR="${MESH_IMAGES_DIR:-$CLUSTER_DIR/images}"
    ;;
  kind)
    [[ -f "$2" ]] || die "no kubeconfig: $2"
    KUBECTL=(kubectl --kubeconfig="$2")
    KIND_CLUSTER="${KIND_CLUSTER:-ambit}"
    read -r NODE_A NODE_B < <("${KUBECTL[@]}" get nodes -o jsonpath='{.items[*].metadata.name}')
    [[ -n "${NODE_B:-}" ]] || die "the kind cluster needs two nodes"
    IMAGES_DIR="${MESH_IMAGES_DIR:-$(mktemp -d /tmp/ambit-kind-images.XXXXXX)}"
    TEST_IMAGE="$BUSYBOX_IMAGE"
    load_images() {
      local f applets=() a
      for a in $(/bin/busybox --list); do [[ "$a" == busybox ]] || applets+=(--symlink "/bin/$a:busybox"); done
      python3 "$REPO_DIR/scripts/oci-image.py" --name "$BUSYBOX_IMAGE" --output "$IMAGES_DIR/busybox.tar" \
        --add /bin/busybox:/bin/busybox "${applets[@]}" --dir /tmp:1777 --env PATH=/bin --cmd /bin/sh
      for f in "$@" "$IMAGES_DIR/busybox.tar"; do kind load image-archive "$f" --name "$KIND_CLUSTER"; done
    }
    on_node() { local n="$1"; shift; docker exec "$n" "$@"; }   # kind nodes are containers named after the node
    finish_provider() { :; }
    ;;
  *) usage ;;
esac
k() { "${KUBECTL[@]}" "$@"; }

finish() {
  local rc=$?
  finish_provider || { log "error: tearing down failed"; rc=1; }
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- node state

# The nodes' CNI conflists, file names and content.
conflists() { # NODE
  on_node "$1" sh -c 'for f in /etc/cni/net.d/*; do echo "== $f"; cat "$f"; done'
}
# The nftables tables of every pod network namespace the runtime pinned on the node, one "netns: tables" line each.
pod_netns_tables() { # NODE
  on_node "$1" sh -c 'for f in /run/netns/cni-*; do [ -e "$f" ] || continue;
    echo "$f: $(nsenter --net="$f" nft list tables 2>&1 | tr "\n" " ")"; done'
}
# Whether the pod's network namespace on NODE has the `inet ambit` table: NODE POD_IP
pod_has_capture() {
  on_node "$1" sh -c 'for f in /run/netns/cni-*; do
    if nsenter --net="$f" ip -o -4 addr show | grep -qF " $0/"; then nsenter --net="$f" nft list table inet ambit >/dev/null 2>&1; exit $?; fi
  done; exit 1' "$2"
}

# ---------------------------------------------------------------- images and install

log "building images into $IMAGES_DIR"
mkdir -p "$IMAGES_DIR"
"$REPO_DIR/scripts/build-images.sh" "$IMAGES_DIR"
tars=()
for i in controller ztunnel node-agent; do
  if [[ -f "$IMAGES_DIR/$i.tar" ]]; then
    tars+=("$IMAGES_DIR/$i.tar")
  else
    fail "image ambit.local/$i:dev was not built (see build-images.sh above)"
  fi
done
load_images "${tars[@]}"
ok "images loaded on the nodes: ${tars[*]##*/}"

for n in "$NODE_A" "$NODE_B"; do
  # Where the agent installs the plugin: the same paths as on a production node.
  check "$n: CNI conf dir /etc/cni/net.d holds the primary network's conflist" \
    on_node "$n" sh -c 'ls /etc/cni/net.d/*.conflist >/dev/null'
done
before_a="$(conflists "$NODE_A")"
before_b="$(conflists "$NODE_B")"

# The CRDs first, so the objects of their kinds (the GatewayClasses) find them established.
k apply --server-side -k "$REPO_DIR/manifests/crds" >/dev/null
k apply --server-side -k "$REPO_DIR/manifests/gateway-api" >/dev/null
k wait --for=condition=Established crd -l app.kubernetes.io/part-of=ambit --timeout=60s >/dev/null
k apply --server-side -k "$OVERLAY" >/dev/null
ok "kubectl apply --server-side -k $OVERLAY"

# ---------------------------------------------------------------- control and data plane up

controller_available() {
  [[ "$(k get deploy -n ambit-system ambit-controller -o jsonpath='{.status.conditions[?(@.type=="Available")].status}')" == True ]]
}
eventually "controller Deployment Available" "$WAIT" controller_available

# ztunnel pod of NODE (name), and whether it took its state from the controller over xDS (its TLS, the projected
# token's TokenReview and the root ConfigMap all work then).
ztunnel_pod() {
  k get pods -n ambit-system -l app=ztunnel --field-selector "spec.nodeName=$1,status.phase=Running" \
    -o jsonpath='{.items[0].metadata.name}' 2>/dev/null
}
ztunnel_synced() { local p; p="$(ztunnel_pod "$1")" && [[ -n "$p" ]] && k logs -n ambit-system "$p" | grep -q 'xds: synced'; }
for n in "$NODE_A" "$NODE_B"; do
  eventually "$n: ztunnel Running and synced with the controller (xds: synced)" "$WAIT" ztunnel_synced "$n"
done

# Rolled out: every scheduled pod updated and ready, on both nodes. ztunnel is ready only once the node agent has
# connected to it over ZDS.
rolled_out() { # DAEMONSET
  local s
  s="$(k get ds -n ambit-system "$1" -o jsonpath='{.status.desiredNumberScheduled}/{.status.updatedNumberScheduled}/{.status.numberReady}')"
  [[ "$s" == 2/2/2 ]]
}
agent_up=1
eventually "DaemonSet ambit-node rolled out on both nodes (2/2 ready)" "$WAIT" rolled_out ambit-node
rolled_out ambit-node || agent_up=0
eventually "DaemonSet ztunnel rolled out on both nodes (2/2 ready: connected to the agent)" 30 rolled_out ztunnel
((agent_up)) || log "the node agent is not running: $(k get pods -n ambit-system -l app=ambit-node \
  -o jsonpath='{range .items[*]}{.spec.nodeName}: {.status.containerStatuses[0].state}{"; "}{end}')"

installed=0
for n in "$NODE_A" "$NODE_B"; do
  plugin_installed() { [[ "$(conflists "$1")" == *ambit-cni* ]] && on_node "$1" test -x /opt/cni/bin/ambit-cni; }
  if ((agent_up == 0)); then
    fail "$n: plugin installation not checked: the node agent is not running"
  elif wait_until "plugin on $n" 30 plugin_installed "$n"; then
    ok "$n: the agent installed ambit-cni in /opt/cni/bin and appended it to the conflist"
    installed=$((installed + 1))
  else
    fail "$n: the agent did not install ambit-cni (binary in /opt/cni/bin, plugin in the conflist)"
  fi
done

# ---------------------------------------------------------------- traffic through the mesh

k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $NS
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: $NS, labels: {app: server}}
spec:
  nodeName: $NODE_B
  terminationGracePeriodSeconds: 1
  tolerations: [{operator: Exists}]
  containers:
  - name: server
    image: $TEST_IMAGE
    imagePullPolicy: IfNotPresent
    command: [sh, -c, 'exec nc -ll -p 8080 -e /bin/echo "hello from server"']
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: $NS, labels: {app: client}}
spec:
  nodeName: $NODE_A
  terminationGracePeriodSeconds: 1
  tolerations: [{operator: Exists}]
  containers:
  - name: client
    image: $TEST_IMAGE
    imagePullPolicy: IfNotPresent
    command: [sleep, "3600"]
EOF
ok "namespace $NS labelled istio.io/dataplane-mode=ambient; server on $NODE_B, client on $NODE_A"
pods_running() {
  [[ "$(k get pods -n "$NS" -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -c '^Running$')" == 2 ]]
}
eventually "server and client Running" "$WAIT" pods_running
server_ip="$(k get pod -n "$NS" server -o jsonpath='{.status.podIP}')"
client_ip="$(k get pod -n "$NS" client -o jsonpath='{.status.podIP}')"

check "server pod ($server_ip) has the capture table inet ambit" pod_has_capture "$NODE_B" "$server_ip"
check "client pod ($client_ip) has the capture table inet ambit" pod_has_capture "$NODE_A" "$client_ip"

# Metric lines of the ztunnel on NODE for connections from the client to the server, summed, as reporter.
opened() { # NODE REPORTER
  local p
  p="$(ztunnel_pod "$1")" && [[ -n "$p" ]] || { echo 0; return; }
  { k get --raw "/api/v1/namespaces/ambit-system/pods/$p:15020/proxy/metrics" 2>/dev/null || true; } \
    | awk -v r="{reporter=\"$2\"" -v s="source_workload_namespace=\"$NS\"" -v d="destination_workload_namespace=\"$NS\"" \
      'index($0, "istio_tcp_connections_opened_total" r) == 1 && index($0, s) && index($0, d) { n += $NF } END { print n + 0 }'
}
src_before="$(opened "$NODE_A" source)"
dst_before="$(opened "$NODE_B" destination)"
reaches() { [[ "$(k exec -n "$NS" client -- nc -w 3 "$server_ip" 8080 </dev/null)" == "hello from server" ]]; }
eventually "client ($NODE_A) reaches server ($NODE_B) on $server_ip:8080" 30 reaches
counted() { (("$(opened "$NODE_A" source)" > src_before && "$(opened "$NODE_B" destination)" > dst_before)); }
if wait_until "metrics" 15 counted; then
  ok "ztunnel metrics count it: $NODE_A reporter=source $src_before -> $(opened "$NODE_A" source), $NODE_B reporter=destination $dst_before -> $(opened "$NODE_B" destination)"
else
  fail "ztunnel metrics do not count the connection (istio_tcp_connections_opened_total: $NODE_A source $src_before -> $(opened "$NODE_A" source), $NODE_B destination $dst_before -> $(opened "$NODE_B" destination))"
fi

# ---------------------------------------------------------------- uninstall

k delete -k "$OVERLAY" --ignore-not-found --wait=true --timeout=120s >/dev/null || fail "kubectl delete -k $OVERLAY"
gone() { [[ -z "$(k get pods -n ambit-system -o name 2>/dev/null)" ]]; }
eventually "ambit-system's pods gone after kubectl delete -k" "$WAIT" gone
if ((installed == 2)); then
  check "$NODE_A: conflists as before the install" test "$(conflists "$NODE_A")" == "$before_a"
  check "$NODE_B: conflists as before the install" test "$(conflists "$NODE_B")" == "$before_b"
  for n in "$NODE_A" "$NODE_B"; do
    check "$n: /opt/cni/bin/ambit-cni removed" on_node "$n" test ! -e /opt/cni/bin/ambit-cni
  done
else
  fail "uninstall not checked: the plugin was never installed on both nodes, so conflists 'as before' would prove nothing"
fi
for n in "$NODE_A" "$NODE_B"; do
  tables="$(pod_netns_tables "$n")"
  if [[ -z "$tables" ]]; then
    fail "$n: no pod network namespace found to check"
  elif grep -q 'inet ambit' <<<"$tables"; then
    fail "$n: a pod network namespace keeps table inet ambit: $tables"
  elif ((installed == 2)); then
    ok "$n: no pod network namespace keeps table inet ambit ($(wc -l <<<"$tables") checked)"
  else
    fail "$n: no inet ambit table left, but none was ever installed: not a check"
  fi
done
k delete namespace "$NS" --wait=false >/dev/null

# ---------------------------------------------------------------- summary

if ((${#failures[@]})); then
  log "mesh.sh ($provider): ${#failures[@]} check(s) FAILED after $((SECONDS - t0))s:"
  printf '  - %s\n' "${failures[@]}" >&2
  exit 1
fi
log "mesh.sh ($provider): all checks passed in $((SECONDS - t0))s"
