#!/usr/bin/env bash
# Ambit on a real cluster, end to end: build the images, load them on the nodes, install the manifests (the
# overlay e2e/cluster/overlay/, which only renames the images; on the project's cluster overlay-nodns/, which
# also stands in for the cluster DNS it lacks), wait for the controller, ztunnel and the node agent on both nodes;
# in an ambient namespace with STRICT mTLS, check capture at pod start, a client on one node reaching a server on
# the other through both ztunnels (mutual_tls in their metrics, the client's own IP at the server), kubelet probes
# (the agent's probe SNAT, with a control), running pods enrolled and released by labelling their namespace
# (dataplane-mode=none left alone), an L4 DENY, a waypoint deployed by the controller applying an HTTPRoute and an
# L7 policy, ztunnel and agent restarts, a ztunnel rollout restart under load;
# then uninstall (namespace unlabelled first) and check that the nodes' CNI conf dirs are as before and no pod
# network namespace keeps an `inet ambit` table. Each phase's time is logged. See e2e/cluster/README.md.
#
#   e2e/cluster/mesh.sh cluster DIR          the two-node cluster of e2e/cluster/up.sh; brought up (and torn down
#                                            at the end) if DIR holds none, else used as it is and left up
#   e2e/cluster/mesh.sh kind KUBECONFIG      a kind cluster (e2e/kind/run.sh); KIND_CLUSTER names it (default ambit)
#
# Every check runs; each failure is reported with FAIL and the exit status is 1 if any failed. Nothing is skipped
# silently: a check that cannot run (e.g. the agent not up) fails.
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
phase_t=$SECONDS
phases=()
# phase NAME: ends the running phase (its time is logged and summed up at the end) and starts NAME.
phase() {
  phases+=("${phase_name:-setup} $((SECONDS - phase_t))s")
  log "---- $1 (${phase_name:-setup} took $((SECONDS - phase_t))s)"
  phase_name="$1" phase_t=$SECONDS
}
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
source "$CLUSTER_DIR_SRC/ambit.sh"
[[ $provider != cluster ]] || set_pod_cidrs   # this project's cluster has no node IPAM (ambit.sh)

finish() {
  local rc=$?
  finish_provider || { log "error: tearing down failed"; rc=1; }
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- node state

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

phase images
log "building images into $IMAGES_DIR"
mkdir -p "$IMAGES_DIR"
"$REPO_DIR/scripts/build-images.sh" "$IMAGES_DIR"
tars=()
for i in controller ztunnel node-agent waypoint; do
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

phase "control and data plane up"
eventually "controller Deployment Available" "$WAIT" controller_available
for n in "$NODE_A" "$NODE_B"; do
  eventually "$n: ztunnel Running and synced with the controller (xds: synced)" "$WAIT" ztunnel_synced "$n"
done

agent_up=1
eventually "DaemonSet ambit-node rolled out on both nodes (2/2 ready)" "$WAIT" rolled_out ambit-node
rolled_out ambit-node || agent_up=0
eventually "DaemonSet ztunnel rolled out on both nodes (2/2 ready: connected to the agent)" 30 rolled_out ztunnel
((agent_up)) || log "the node agent is not running: $(k get pods -n ambit-system -l app=ambit-node \
  -o jsonpath='{range .items[*]}{.spec.nodeName}: {.status.containerStatuses[0].state}{"; "}{end}')"

installed=0
for n in "$NODE_A" "$NODE_B"; do
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

phase "traffic through the mesh"
# mesh-test (ambient): server on NODE_B, client on NODE_A (service account `client`, for the AuthorizationPolicy),
# STRICT mTLS, and `probed` with an HTTP readiness probe (the kubelet's probe needs the node's probe SNAT then; an
# HTTP probe, not a TCP one: a TCP connect can complete before ztunnel resets the refused connection).
# mesh-late (not labelled yet): `late` and `optout` (istio.io/dataplane-mode=none), both running before the label.
# The server answers with the first line "hello from server", then its view of the connection (netstat), so the
# client sees which source address the server saw.
k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $NS
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Namespace
metadata:
  name: mesh-late
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: $NS}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: $NS}
spec:
  mtls: {mode: STRICT}
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
    command: [nc, -ll, -p, "8080", -e, /bin/sh, -c, 'echo hello from server; netstat -tn | grep ":8080 "']
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: $NS, labels: {app: client}}
spec:
  nodeName: $NODE_A
  serviceAccountName: client
  terminationGracePeriodSeconds: 1
  tolerations: [{operator: Exists}]
  containers:
  - name: client
    image: $TEST_IMAGE
    imagePullPolicy: IfNotPresent
    command: [sleep, "3600"]
---
apiVersion: v1
kind: Pod
metadata: {name: probed, namespace: $NS, labels: {app: probed}}
spec:
  nodeName: $NODE_B
  terminationGracePeriodSeconds: 1
  tolerations: [{operator: Exists}]
  containers:
  - name: probed
    image: $TEST_IMAGE
    imagePullPolicy: IfNotPresent
    command: [sh, -c, 'mkdir -p /www && echo probed >/www/index.html && exec httpd -f -p 8081 -h /www']
    readinessProbe:
      httpGet: {path: /, port: 8081}
      periodSeconds: 2
      failureThreshold: 1
---
apiVersion: v1
kind: Pod
metadata: {name: late, namespace: mesh-late}
spec:
  nodeName: $NODE_A
  terminationGracePeriodSeconds: 1
  tolerations: [{operator: Exists}]
  containers:
  - {name: late, image: $TEST_IMAGE, imagePullPolicy: IfNotPresent, command: [sleep, "3600"]}
---
apiVersion: v1
kind: Pod
metadata: {name: optout, namespace: mesh-late, labels: {istio.io/dataplane-mode: none}}
spec:
  nodeName: $NODE_A
  terminationGracePeriodSeconds: 1
  tolerations: [{operator: Exists}]
  containers:
  - {name: optout, image: $TEST_IMAGE, imagePullPolicy: IfNotPresent, command: [sleep, "3600"]}
EOF
ok "namespace $NS labelled istio.io/dataplane-mode=ambient (STRICT PeerAuthentication); server and probed on $NODE_B, client on $NODE_A; mesh-late not labelled"
pods_running() { # NAMESPACE COUNT
  [[ "$(k get pods -n "$1" -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -c '^Running$')" == "$2" ]]
}
eventually "server, client, probed Running" "$WAIT" pods_running "$NS" 3
eventually "late, optout Running" "$WAIT" pods_running mesh-late 2
pod_ip() { k get pod -n "$1" "$2" -o jsonpath='{.status.podIP}'; }
server_ip="$(pod_ip "$NS" server)"
client_ip="$(pod_ip "$NS" client)"
probed_ip="$(pod_ip "$NS" probed)"

check "server pod ($server_ip) captured at start: table inet ambit" pod_has_capture "$NODE_B" "$server_ip"
check "client pod ($client_ip) captured at start: table inet ambit" pod_has_capture "$NODE_A" "$client_ip"

# Metric lines of the ztunnel on NODE for mutual-TLS connections from the client to the server, summed, as reporter.
opened() { # NODE REPORTER
  local p
  p="$(ztunnel_pod "$1")" && [[ -n "$p" ]] || { echo 0; return; }
  { k get --raw "/api/v1/namespaces/ambit-system/pods/$p:15020/proxy/metrics" 2>/dev/null || true; } \
    | awk -v r="{reporter=\"$2\"" -v s="source_workload_namespace=\"$NS\"" -v d="destination_workload_namespace=\"$NS\"" \
      -v m='connection_security_policy="mutual_tls"' \
      'index($0, "istio_tcp_connections_opened_total" r) == 1 && index($0, s) && index($0, d) && index($0, m) { n += $NF } END { print n + 0 }'
}
src_before="$(opened "$NODE_A" source)"
dst_before="$(opened "$NODE_B" destination)"
answer=""
reaches() { answer="$(k exec -n "$NS" client -- nc -w 3 "$server_ip" 8080 </dev/null 2>&1)"; [[ "${answer%%$'\n'*}" == "hello from server" ]]; }
eventually "client ($NODE_A) reaches server ($NODE_B) on $server_ip:8080" 30 reaches
check "the server saw the client's pod IP $client_ip as the source: $(grep -o "$client_ip:[0-9]*" <<<"$answer" | head -1)" \
  grep -q " $client_ip:[0-9]* " <<<"$answer"
counted() { (("$(opened "$NODE_A" source)" > src_before && "$(opened "$NODE_B" destination)" > dst_before)); }
if wait_until "metrics" 15 counted; then
  ok "ztunnel metrics count it as mutual_tls: $NODE_A reporter=source $src_before -> $(opened "$NODE_A" source), $NODE_B reporter=destination $dst_before -> $(opened "$NODE_B" destination)"
else
  fail "ztunnel metrics do not count a mutual_tls connection (istio_tcp_connections_opened_total: $NODE_A source $src_before -> $(opened "$NODE_A" source), $NODE_B destination $dst_before -> $(opened "$NODE_B" destination))"
fi

# ---------------------------------------------------------------- kubelet probes under STRICT mTLS

phase "kubelet probes under STRICT"
for n in "$NODE_A" "$NODE_B"; do
  check "$n: the agent installed the probe SNAT (table inet ambit-node, $(node_pod_cidr "$n" 2>/dev/null || echo '?'))" \
    on_node "$n" sh -c 'nft list table inet ambit-node | grep -q "snat ip to 169.254.7.127"'
done
check "probed ($probed_ip) captured: table inet ambit" pod_has_capture "$NODE_B" "$probed_ip"
probed_ready() { [[ "$(k get pod -n "$NS" probed -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" == True ]]; }
eventually "probed (HTTP readiness probe, STRICT PeerAuthentication) Ready" 30 probed_ready
# The control: without the node's SNAT the same probe is plaintext from the node into a STRICT pod, and fails.
# (The agent installs the SNAT at start only: the agent restart below puts it back.)
on_node "$NODE_B" nft delete table inet ambit-node
probed_not_ready() { ! probed_ready; }
eventually "without the probe SNAT on $NODE_B (table deleted) probed becomes NotReady: STRICT refuses the plaintext probe" 30 probed_not_ready

# ---------------------------------------------------------------- enrollment of running pods

phase "enroll running pods"
late_ip="$(pod_ip mesh-late late)"
optout_ip="$(pod_ip mesh-late optout)"
no_capture() { ! pod_has_capture "$@"; }
check "late ($late_ip) not captured before its namespace is labelled" no_capture "$NODE_A" "$late_ip"
k label namespace mesh-late istio.io/dataplane-mode=ambient >/dev/null
eventually "late enrolled without restart once mesh-late is labelled ambient (table inet ambit)" 30 pod_has_capture "$NODE_A" "$late_ip"
check "optout (istio.io/dataplane-mode=none) left alone" no_capture "$NODE_A" "$optout_ip"
late_restarts="$(k get pod -n mesh-late late -o jsonpath='{.status.containerStatuses[0].restartCount}')"
check "late not restarted (restartCount $late_restarts)" test "$late_restarts" == 0
k label namespace mesh-late istio.io/dataplane-mode- >/dev/null
eventually "late released when the label is removed (table gone)" 30 no_capture "$NODE_A" "$late_ip"

# ---------------------------------------------------------------- L4 authorization

phase "L4 AuthorizationPolicy"
refused() { local a; a="$(k exec -n "$NS" client -- nc -w 3 "$server_ip" 8080 </dev/null 2>&1)"; [[ "${a%%$'\n'*}" != "hello from server" ]]; }
k apply -f - >/dev/null <<EOF
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: $NS}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/$NS/sa/client"]}}]
EOF
eventually "DENY by principal cluster.local/ns/$NS/sa/client: the client is refused" 30 refused
k delete authorizationpolicy -n "$NS" deny-client >/dev/null
eventually "policy deleted: the client reaches the server again" 30 reaches

# ---------------------------------------------------------------- waypoint (L7)

phase "waypoint (L7)"
# A waypoint Gateway in $NS, deployed by the controller; the Service `web` (pods web-v1 on NODE_B, web-v2 on NODE_A,
# busybox httpd with a CGI script that prints its version and the request's x-* headers) uses it. An HTTPRoute on
# `web` sends `x-version: v2` to web-v2 and everything else to web-v1 with a header added: without the waypoint the
# Service's ClusterIP picks either pod at random, so 20 answers in a row from the right one show the route applied.
# Then an L7 AuthorizationPolicy bound to the waypoint denies one path.
web_pod() { # NAME NODE VERSION
  cat <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $1, namespace: $NS, labels: {app: web, version: $3}}
spec:
  nodeName: $2
  terminationGracePeriodSeconds: 1
  tolerations: [{operator: Exists}]
  containers:
  - name: web
    image: $TEST_IMAGE
    imagePullPolicy: IfNotPresent
    command: [sh, -c, 'mkdir -p /www/cgi-bin && printf "#!/bin/sh\necho Content-Type: text/plain\necho\necho version=$3\nenv | grep ^HTTP_X_ | sort\n" >/www/cgi-bin/echo && chmod +x /www/cgi-bin/echo && exec httpd -f -p 8080 -h /www']
---
EOF
}
web_service() { # NAME SELECTOR [LABELS]
  cat <<EOF
apiVersion: v1
kind: Service
metadata: {name: $1, namespace: $NS, labels: {${3:-}}}
spec:
  selector: {$2}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
EOF
}
{
  web_pod web-v1 "$NODE_B" v1
  web_pod web-v2 "$NODE_A" v2
  web_service web "app: web" "istio.io/use-waypoint: waypoint"
  web_service web-v1 "app: web, version: v1"
  web_service web-v2 "app: web, version: v2"
  cat <<EOF
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: $NS}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: $NS}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - matches: [{headers: [{name: x-version, value: v2}]}]
    backendRefs: [{name: web-v2, port: 80}]
  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-routed-by, value: waypoint}]}}]
    backendRefs: [{name: web-v1, port: 80}]
EOF
} | k apply -f - >/dev/null
ok "waypoint Gateway, Services web (istio.io/use-waypoint: waypoint), web-v1, web-v2, HTTPRoute web applied"
web_running() { [[ "$(k get pods -n "$NS" -l app=web -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -c '^Running$')" == 2 ]]; }
eventually "web-v1, web-v2 Running" "$WAIT" web_running
eventually "the controller deployed the waypoint and it is Available (its certificate and configuration from the controller)" "$WAIT" waypoint_available "$NS"
gateway_programmed() {
  [[ "$(k get gateway -n "$NS" waypoint -o jsonpath='{.status.conditions[?(@.type=="Programmed")].status}')" == True ]]
}
eventually "Gateway waypoint status Programmed=True" 30 gateway_programmed
route_accepted() {
  [[ "$(k get httproute -n "$NS" web -o jsonpath='{.status.parents[0].conditions[?(@.type=="Accepted")].status}')" == True ]]
}
eventually "HTTPRoute web status Accepted=True (parentRef Service web)" 30 route_accepted
web_ip="$(k get svc -n "$NS" web -o jsonpath='{.spec.clusterIP}')"
# requests N PATH [HEADER]: N HTTP/1.1 requests from the client to web's ClusterIP, each answer on its own lines
# ("----" between them). nc, not wget: busybox's static wget crashes without the NSS libraries the image lacks.
requests() {
  k exec -n "$NS" client -- sh -c 'i=0; while [ $i -lt "$1" ]; do
      printf "GET $2 HTTP/1.1\r\nHost: web\r\nConnection: close\r\n$3\r\n" | nc -w 5 "$4" 80; echo; echo ----; i=$((i + 1)); done' \
    sh "$1" "$2" "${3:+$3\r\n}" "$web_ip" 2>&1
}
# all_answers WANT N PATH [HEADER]: every one of N answers has the line WANT (e.g. version=v1).
all_answers() {
  local want="$1" got; shift
  got="$(requests "$@" | awk -v w="$want" '/^----/ { print (hit ? w : "other: " first); hit = 0; first = ""; next }
    first == "" { first = $0 } $0 == w { hit = 1 }' | sort | uniq -c | tr -s ' ' | tr -d '\r' | tr '\n' ';')"
  [[ "$got" == " $1 $want;" ]] || { log "answers: $got"; return 1; }
}
eventually "20 requests to web ($web_ip) all answered by web-v1 (the route's default rule)" 60 \
  all_answers version=v1 20 /cgi-bin/echo
check "20 requests with x-version: v2 all answered by web-v2 (header match)" \
  all_answers version=v2 20 /cgi-bin/echo "x-version: v2"
check "the route's RequestHeaderModifier reached web-v1 (x-routed-by: waypoint)" \
  all_answers HTTP_X_ROUTED_BY=waypoint 1 /cgi-bin/echo
k apply -f - >/dev/null <<EOF
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: $NS}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/cgi-bin/admin*"]}}]
EOF
admin_denied() { requests 1 /cgi-bin/admin | head -1 | grep -q '^HTTP/1.1 403 '; }
eventually "L7 DENY on paths /cgi-bin/admin* at the waypoint: 403" 30 admin_denied
check "other paths still answered by web-v1 under the DENY" all_answers version=v1 5 /cgi-bin/echo
# The waypoint's own metrics (Istio's names, reporter=waypoint), read through the API server's pod proxy.
waypoint_requests() { # RESPONSE_CODE
  local p
  p="$(k get pods -n "$NS" -l gateway.networking.k8s.io/gateway-name=waypoint -o jsonpath='{.items[0].metadata.name}')"
  { k get --raw "/api/v1/namespaces/$NS/pods/$p:15020/proxy/metrics" 2>/dev/null || true; } | awk -v c="response_code=\"$1\"" \
    'index($0, "istio_requests_total{") == 1 && index($0, "reporter=\"waypoint\"") && index($0, c) { n += $NF } END { print n + 0 }'
}
n200="$(waypoint_requests 200)" n403="$(waypoint_requests 403)"
if ((n200 >= 46 && n403 >= 1)); then
  ok "waypoint metrics: istio_requests_total{reporter=\"waypoint\"} counts $n200 answered 200, $n403 denied 403"
else
  fail "waypoint metrics: istio_requests_total{reporter=\"waypoint\"} counts $n200 answered 200 (want >= 46), $n403 denied 403 (want >= 1)"
fi
k delete authorizationpolicy -n "$NS" deny-admin >/dev/null
k delete httproute -n "$NS" web >/dev/null
k delete gateway -n "$NS" waypoint >/dev/null
k delete pod -n "$NS" web-v1 web-v2 --wait=false >/dev/null
k delete svc -n "$NS" web web-v1 web-v2 >/dev/null
waypoint_gone() { [[ -z "$(k get deploy -n "$NS" -o name 2>/dev/null)" ]]; }
eventually "Gateway deleted: its waypoint Deployment removed (owner reference)" "$WAIT" waypoint_gone

# ---------------------------------------------------------------- ztunnel and agent restarts

phase "ztunnel and agent restarts"
all_captured() {
  pod_has_capture "$NODE_A" "$client_ip" && pod_has_capture "$NODE_B" "$server_ip" && pod_has_capture "$NODE_B" "$probed_ip"
}
old="$(ztunnel_pod "$NODE_B")"
k delete pod -n ambit-system "$old" --wait=false >/dev/null
new_ztunnel() { local p; p="$(ztunnel_pod "$NODE_B")" && [[ -n "$p" && "$p" != "$old" ]] && rolled_out ztunnel; }
eventually "$NODE_B: ztunnel pod deleted, recreated and ready again" "$WAIT" new_ztunnel
check "pods still captured after the ztunnel restart" all_captured
eventually "traffic flows after the ztunnel restart" 30 reaches
old="$(k get pods -n ambit-system -l app=ambit-node --field-selector "spec.nodeName=$NODE_B" -o jsonpath='{.items[0].metadata.name}')"
k delete pod -n ambit-system "$old" --wait=true --timeout=60s >/dev/null
eventually "$NODE_B: agent pod restarted and ready again" "$WAIT" rolled_out ambit-node
check "pods still captured after the agent restart" all_captured
eventually "traffic flows after the agent restart" 30 reaches
eventually "probed Ready again: the restarted agent reinstalled the probe SNAT" 30 probed_ready

# ---------------------------------------------------------------- ztunnel rolling restart under load

phase "ztunnel rollout restart under load"
k exec -n "$NS" client -- sh -c "rm -f /tmp/ok /tmp/bad; i=0; while [ \$i -lt 400 ] && [ ! -e /tmp/stop ]; do
    if [ \"\$(nc -w 3 $server_ip 8080 </dev/null | head -1)\" = 'hello from server' ]; then echo >>/tmp/ok; else echo >>/tmp/bad; fi
    i=\$((i + 1)); sleep 0.1; done" >/dev/null 2>&1 &
loop=$!
sleep 2
k rollout restart daemonset/ztunnel -n ambit-system >/dev/null
if k rollout status daemonset/ztunnel -n ambit-system --timeout=120s >/dev/null; then ok "ztunnel rolled out again"; else fail "ztunnel rollout restart did not finish"; fi
sleep 2
k exec -n "$NS" client -- touch /tmp/stop
wait "$loop" || true
counts="$(k exec -n "$NS" client -- sh -c 'echo $(cat /tmp/ok 2>/dev/null | wc -l) $(cat /tmp/bad 2>/dev/null | wc -l)')"
read -r n_ok n_bad <<<"$counts"
if ((n_ok > 0 && n_bad == 0)); then
  ok "connections during the ztunnel rollout: $n_ok succeeded, 0 failed"
else
  fail "connections during the ztunnel rollout: $n_ok succeeded, $n_bad failed"
fi

# ---------------------------------------------------------------- uninstall

phase uninstall
# Istio's documented order (and ours, README "Uninstall"): remove the dataplane-mode label first, so the agent
# releases the pods (capture rules gone, ztunnel stops serving them), then delete the installation. The agent does
# not release pods when it stops (a restart or upgrade must not drop them from the mesh); pods still labelled when
# the agent is deleted keep their capture until they are restarted.
k label namespace "$NS" istio.io/dataplane-mode- >/dev/null
released() { no_capture "$NODE_A" "$client_ip" && no_capture "$NODE_B" "$server_ip" && no_capture "$NODE_B" "$probed_ip"; }
eventually "$NS unlabelled: client, server, probed released (no inet ambit table)" 30 released
k delete -k "$OVERLAY" --ignore-not-found --wait=true --timeout=120s >/dev/null || fail "kubectl delete -k $OVERLAY"
gone() { [[ -z "$(k get pods -n ambit-system -o name 2>/dev/null)" ]]; }
eventually "ambit-system's pods gone after kubectl delete -k" "$WAIT" gone
if ((installed == 2)); then
  same_conflists() { # NODE BEFORE
    local now
    now="$(conflists "$1")"
    [[ "$now" == "$2" ]] || { diff <(echo "$2") <(echo "$now") >&2 || true; return 1; }
  }
  check "$NODE_A: conflists (and no plugin kubeconfig) byte for byte as before the install" same_conflists "$NODE_A" "$before_a"
  check "$NODE_B: conflists (and no plugin kubeconfig) byte for byte as before the install" same_conflists "$NODE_B" "$before_b"
  for n in "$NODE_A" "$NODE_B"; do
    check "$n: /opt/cni/bin/ambit-cni removed" on_node "$n" test ! -e /opt/cni/bin/ambit-cni
    check "$n: node table inet ambit-node removed" on_node "$n" sh -c '! nft list table inet ambit-node >/dev/null 2>&1'
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
k delete namespace "$NS" mesh-late --wait=false >/dev/null
phase done

# ---------------------------------------------------------------- summary

log "phases: $(IFS=';'; echo "${phases[*]:1}")"
if ((${#failures[@]})); then
  log "mesh.sh ($provider): ${#failures[@]} check(s) FAILED after $((SECONDS - t0))s:"
  printf '  - %s\n' "${failures[@]}" >&2
  exit 1
fi
log "mesh.sh ($provider): all checks passed in $((SECONDS - t0))s"
