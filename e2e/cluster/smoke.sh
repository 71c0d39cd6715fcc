#!/usr/bin/env bash
# End-to-end proof of the two-node cluster: build (or reuse) the binaries, up,
# run real pods on both nodes (a DaemonSet, a client on node1, a server on
# node2), check their addresses, exec, logs, pod-to-pod TCP across the nodes
# and the API server from a pod; down; then check that the machine is as it
# was. Exits non-zero on any mismatch.
#   e2e/cluster/smoke.sh [DIR]   (DIR defaults to a fresh temporary directory)
# Without root or a package it needs, it skips, unless CI is set: then it fails.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

t0=$SECONDS
missing="$(missing_prerequisites)"
if [[ -n "$missing" ]]; then
  [[ -n "${CI:-}" ]] && die "FAIL: prerequisites missing: $missing (CI is set, so this fails)"
  log "SKIP: prerequisites missing: $missing (scripts/install-deps.sh; run as root)"
  exit 0
fi

t_build=$SECONDS
"$KUBE_SRC/build.sh" >/dev/null
t_build=$((SECONDS - t_build))

if [[ $# -ge 1 ]]; then
  set_cluster_dir "$1"
  keep=1
else
  set_cluster_dir "$(mktemp -d /tmp/ambit-cluster-smoke.XXXXXX)"
  keep=0
fi

fail() { log "FAIL: $*"; exit 1; }
expect() { # WHAT GOT WANT
  [[ "$2" == "$3" ]] || fail "$1: got '$2', want '$3'"
  log "ok: $1 = $3"
}
# retry WHAT SECONDS CMD...: CMD until it succeeds (poll, do not sleep blindly).
retry() { wait_until "$@" || fail "$1"; log "ok: $1"; }

# ---------------------------------------------------------------- machine state

# What a cluster could leave behind on the host, as text to compare before
# and after: our namespaces, links, routes, mounts, processes and cgroups,
# the sysctls the kubelet and kube-proxy touch, the host paths daemons create
# when nothing keeps them per node, and the host's firewall.
snapshot_machine() {
  echo "## netns"
  ip netns list | grep -E '^ambit-node' || true
  echo "## links"
  ip -o link show | awk -F': ' '{ print $2 }' | grep -E '^(ambit-|cni0)' || true
  echo "## routes"
  ip route show | grep -E '10\.244\.|10\.250\.' || true
  echo "## mounts"
  grep -F "$CLUSTER_DIR/" /proc/self/mountinfo | awk '{ print $5 }' || true
  echo "## processes"
  local p
  for p in /proc/[0-9]*; do
    tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -qF -- "$CLUSTER_DIR/" && echo "${p#/proc/}"
  done
  for n in "${NODES[@]}"; do cgroup_pids "$(node_cgroup "$n")"; done
  echo "## cgroups"
  ls -d /sys/fs/cgroup/*/ambit-node* 2>/dev/null || true
  echo "## sysctls"
  sysctl "${KUBELET_SYSCTLS[@]}" net.ipv4.ip_forward net.netfilter.nf_conntrack_max 2>&1
  echo "## host paths"
  for p in /var/lib/kubelet /var/log/containers /var/log/pods /run/containerd /var/lib/containerd \
    /var/lib/cni /etc/cni /opt/cni /opt/containerd /usr/libexec/kubernetes /etc/kubernetes \
    /run/xtables.lock; do
    [[ -e "$p" ]] && echo "$p"
  done
  find /run/netns -maxdepth 1 -name 'cni-*' 2>/dev/null || true
  echo "## host firewall"
  nft list ruleset 2>&1 | sha256sum
}

finish() {
  local rc=$?
  if [[ -f "$ENV_FILE" ]]; then
    log "tearing down after a failure"
    "$CLUSTER_DIR_SRC/down.sh" "$CLUSTER_DIR" || true
  fi
  if ((rc == 0)) && ((keep == 0)); then rm -rf "$CLUSTER_DIR"; fi
  ((rc == 0)) || log "FAILED after $((SECONDS - t0))s (state in $CLUSTER_DIR)"
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM   # so that finish runs on Ctrl-C too

before="$(snapshot_machine)"
sysctls_before="$(sysctl "${KUBELET_SYSCTLS[@]}" | tr '\n' ' ')"

# ---------------------------------------------------------------- up

t_up=$SECONDS
"$CLUSTER_DIR_SRC/up.sh" "$CLUSTER_DIR" >/dev/null
t_up=$((SECONDS - t_up))
t_checks=$SECONDS
# shellcheck source=/dev/null
source "$ENV_FILE"
k() { "$KUBE_BIN/kubectl" --kubeconfig="$KUBECONFIG" "$@"; }

expect "nodes Ready" \
  "$(k get nodes -o jsonpath='{range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status} {end}')" \
  "node1=True node2=True "
expect "machine-wide sysctls after up (restored)" "$(sysctl "${KUBELET_SYSCTLS[@]}" | tr '\n' ' ')" \
  "$sysctls_before"

# ---------------------------------------------------------------- workloads

k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata: {name: smoke}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent, namespace: smoke}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: agent
        image: $BUSYBOX_IMAGE
        imagePullPolicy: Never
        command: [sleep, "3600"]
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: smoke, labels: {app: server}}
spec:
  nodeSelector: {kubernetes.io/hostname: node2}
  terminationGracePeriodSeconds: 1
  containers:
  - name: server
    image: $BUSYBOX_IMAGE
    imagePullPolicy: Never
    command: [sh, -c, 'echo "listening on 8080"; exec nc -ll -p 8080 -e /bin/echo "hello from \$(hostname)"']
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: smoke}
spec:
  nodeSelector: {kubernetes.io/hostname: node1}
  terminationGracePeriodSeconds: 1
  containers:
  - name: client
    image: $BUSYBOX_IMAGE
    imagePullPolicy: Never
    command: [sleep, "3600"]
EOF

pods_running() { # all pods of namespace smoke Running, and 4 of them
  [[ "$(k get pods -n smoke -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -c '^Running$')" == 4 ]]
}
retry "4 pods Running (daemonset x2, server, client)" 90 pods_running
expect "daemonset ready" "$(k get ds -n smoke agent -o jsonpath='{.status.numberReady}/{.status.desiredNumberScheduled}')" "2/2"

# Every pod has an address on its own node's bridge range.
while read -r name node ip; do
  [[ "$ip" == "10.244.$(node_index "$node")."* ]] || fail "pod $name on $node has IP $ip"
  log "ok: pod $name on $node has $ip"
done < <(k get pods -n smoke -o jsonpath='{range .items[*]}{.metadata.name} {.spec.nodeName} {.status.podIP}{"\n"}{end}')
expect "nodes of the DaemonSet's pods" \
  "$(k get pods -n smoke -l app=agent -o jsonpath='{range .items[*]}{.spec.nodeName}{"\n"}{end}' | sort | tr '\n' ' ')" \
  "node1 node2 "
server_ip="$(k get pod -n smoke server -o jsonpath='{.status.podIP}')"
expect "server's node" "$(k get pod -n smoke server -o jsonpath='{.spec.nodeName}')" node2
expect "client's node" "$(k get pod -n smoke client -o jsonpath='{.spec.nodeName}')" node1

# ---------------------------------------------------------------- exec, logs, traffic

expect "kubectl exec" "$(k exec -n smoke client -- hostname)" client
logs_say_listening() { [[ "$(k logs -n smoke server)" == "listening on 8080" ]]; }
retry "kubectl logs server = listening on 8080" 10 logs_say_listening

# node1 sends the server's packets to node2 over the link (no NAT anywhere).
expect "node1's route to the server" \
  "$(ip -n "$(node_netns node1)" route get "$server_ip" | grep -o "via [0-9.]* dev [a-z0-9]*")" \
  "via $(node_ip node2) dev eth0"
# Packets node N routed (Ip ForwDatagrams in its namespace): the nodes' own
# traffic with the API server is not routed, pod traffic between nodes is.
forwarded() { # NODE
  nsenter --net="/run/netns/$(node_netns "$1")" cat /proc/net/snmp \
    | awk '$1 == "Ip:" { if (!h) { for (i = 1; i <= NF; i++) if ($i == "ForwDatagrams") c = i; h = 1 } else print $c }'
}
fwd1="$(forwarded node1)"
fwd2="$(forwarded node2)"
cross_node() { [[ "$(k exec -n smoke client -- nc -w 3 "$server_ip" 8080 </dev/null)" == "hello from server" ]]; }
retry "client (node1) -> server (node2) over TCP: hello from server" 20 cross_node
(("$(forwarded node1)" > fwd1 && "$(forwarded node2)" > fwd2)) \
  || fail "node1 and node2 did not both route packets (ForwDatagrams $fwd1 -> $(forwarded node1), $fwd2 -> $(forwarded node2))"
log "ok: both nodes routed the packets (node1 ForwDatagrams $fwd1 -> $(forwarded node1), node2 $fwd2 -> $(forwarded node2))"

# A ClusterIP Service in front of the server, through node1's kube-proxy
# rules (which come a second or two after the Service: retry).
k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Service
metadata: {name: server, namespace: smoke}
spec:
  selector: {app: server}
  ports: [{port: 80, targetPort: 8080}]
EOF
service_ip="$(k get svc -n smoke server -o jsonpath='{.spec.clusterIP}')"
via_service() { [[ "$(k exec -n smoke client -- nc -w 3 "$service_ip" 80 </dev/null)" == "hello from server" ]]; }
retry "client (node1) -> Service $service_ip:80 -> server (node2)" 20 via_service

# The API server from a pod, as in-cluster clients reach it: 10.96.0.1:443
# (kube-proxy) -> the default/kubernetes EndpointSlice -> the forwarder on the
# bridge. Plain HTTP to its TLS port earns Go's "400 Bad Request".
api_from_pod() {
  k exec -n smoke client -- sh -c 'printf "GET / HTTP/1.0\r\n\r\n" | nc -w 3 10.96.0.1 443' \
    | head -n 1 | grep -q '^HTTP/1.0 400 Bad Request'
}
retry "API server from a pod through 10.96.0.1:443" 20 api_from_pod
t_checks=$((SECONDS - t_checks))

# ---------------------------------------------------------------- down

t_down=$SECONDS
"$CLUSTER_DIR_SRC/down.sh" "$CLUSTER_DIR"
t_down=$((SECONDS - t_down))
after="$(snapshot_machine)"
if [[ "$before" != "$after" ]]; then
  diff <(echo "$before") <(echo "$after") >&2 || true
  fail "the machine is not as it was before up (diff above: < before, > after)"
fi
log "ok: machine as before (namespaces, links, routes, mounts, processes, cgroups, sysctls, host paths, firewall)"
for leftover in "$(ip netns list | grep '^ambit-node' || true)" "$(ls -d /sys/fs/cgroup/*/ambit-node* 2>/dev/null || true)"; do
  [[ -z "$leftover" ]] || fail "left behind: $leftover"
done

log "smoke passed in $((SECONDS - t0))s: build.sh ${t_build}s, up ${t_up}s, checks ${t_checks}s, down ${t_down}s"
