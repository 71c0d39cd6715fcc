#!/usr/bin/env bash
# End-to-end proof of the kube test cluster: build (or reuse) the binaries,
# start etcd + kube-apiserver, act as a user and as a kubelet would, check
# service-account tokens with TokenReview, stop. Exits non-zero on any failure.
#   e2e/kube/smoke.sh [DIR]     (DIR defaults to a fresh temporary directory)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

t0=$SECONDS
bin="$("$KUBE_DIR/build.sh")"
log "build.sh: $((SECONDS - t0))s"

if [[ $# -ge 1 ]]; then
  dir="$1"
  keep=1
else
  dir="$(mktemp -d /tmp/ambit-kube-smoke.XXXXXX)"
  keep=0
fi
finish() {
  "$KUBE_DIR/stop.sh" "$dir" || true
  [[ $keep == 1 ]] || rm -rf "$dir"
}
trap finish EXIT

t1=$SECONDS
KUBE_BIN="$bin" "$KUBE_DIR/start.sh" "$dir" >&2
log "start.sh: $((SECONDS - t1))s"
# shellcheck source=/dev/null
source "$dir/env"
export KUBECONFIG
k() { "$KUBE_BIN/kubectl" "$@"; }
# curl as cluster admin, for the calls a kubelet or the controller make raw.
api() { curl -fsS --cacert "$CA_CERT" --cert "$ADMIN_CERT" --key "$ADMIN_KEY" "$@"; }

expect() { # WHAT GOT WANT
  if [[ "$2" != "$3" ]]; then
    log "FAIL: $1: got '$2', want '$3'"
    exit 1
  fi
  log "ok: $1 = $3"
}

expect "server version" "$(k version -o json | jq -r .serverVersion.gitVersion)" "$(kube_version)"

# Namespace with the ambient opt-in label, via server-side apply.
k apply --server-side --field-manager=ambit-smoke -f - >&2 <<'EOF'
apiVersion: v1
kind: Namespace
metadata:
  name: smoke
  labels:
    istio.io/dataplane-mode: ambient
EOF
expect "namespace label" \
  "$(k get ns smoke -o jsonpath='{.metadata.labels.istio\.io/dataplane-mode}')" ambient

# The controller-manager creates each namespace's "default" account.
wait_until() { # WHAT CMD...: retry CMD for up to 30s
  local what="$1" i
  shift
  for i in $(seq 1 150); do
    "$@" >/dev/null 2>&1 && { log "ok: $what"; return 0; }
    sleep 0.2
  done
  log "FAIL: $what: not after 30s"
  exit 1
}
wait_until "default service account created" k get serviceaccount default -n smoke

k create -f - >&2 <<'EOF'
apiVersion: v1
kind: Node
metadata:
  name: node-1
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: reviews
  namespace: smoke
---
apiVersion: v1
kind: Pod
metadata:
  name: reviews-1
  namespace: smoke
  labels:
    app: reviews
spec:
  nodeName: node-1
  serviceAccountName: reviews
  containers:
  - name: app
    image: example.invalid/reviews:1
---
apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: smoke
spec:
  selector:
    app: reviews
  ports:
  - name: http
    port: 9080
EOF

# Report node-1 ready, as its kubelet would, and lift the not-ready taint the
# API server put on it at creation (the node-lifecycle controller's job; it
# does not run here because it would evict pods of nodes without a kubelet).
api -X PATCH -H 'Content-Type: application/merge-patch+json' \
  "$APISERVER_URL/api/v1/nodes/node-1/status" \
  -d '{"status":{"conditions":[{"type":"Ready","status":"True","reason":"KubeletReady"}],"addresses":[{"type":"InternalIP","address":"172.18.0.2"}]}}' \
  >/dev/null
k taint node node-1 node.kubernetes.io/not-ready:NoSchedule- >&2
expect "node-1 taints" "$(k get node node-1 -o jsonpath='{.spec.taints}')" ""

# Report the pod running, as the kubelet on node-1 would: PATCH .../status.
api -X PATCH -H 'Content-Type: application/merge-patch+json' \
  "$APISERVER_URL/api/v1/namespaces/smoke/pods/reviews-1/status" \
  -d '{"status":{"phase":"Running","podIP":"10.244.1.5","podIPs":[{"ip":"10.244.1.5"}],"hostIP":"172.18.0.2","conditions":[{"type":"Ready","status":"True"}]}}' \
  >/dev/null
expect "pod status" \
  "$(k get pod -n smoke reviews-1 -o jsonpath='{.spec.nodeName} {.status.phase} {.status.podIP}')" \
  "node-1 Running 10.244.1.5"

expect "service cluster IP range" \
  "$(k get svc -n smoke reviews -o jsonpath='{.spec.clusterIP}' | cut -d. -f1-2)" "10.96"
# The EndpointSlice controller sees the ready pod behind the service.
slice_ready() {
  [[ "$(k get endpointslices -n smoke -l kubernetes.io/service-name=reviews \
    -o jsonpath='{.items[0].endpoints[0].addresses[0]} {.items[0].endpoints[0].conditions.ready}')" \
    == "10.244.1.5 true" ]]
}
wait_until "endpointslice lists 10.244.1.5 ready" slice_ready

# The DaemonSet controller places a pod on every node, as for ztunnel.
k create -f - >&2 <<'EOF'
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: agent
  namespace: smoke
spec:
  selector:
    matchLabels:
      app: agent
  template:
    metadata:
      labels:
        app: agent
    spec:
      serviceAccountName: reviews
      containers:
      - name: agent
        image: example.invalid/agent:1
EOF
# DaemonSet pods name their node in a node affinity; the scheduler (absent
# here) binds them. Tests bind them as the scheduler would.
ds_pod_for_node() {
  [[ "$(k get pods -n smoke -l app=agent -o jsonpath='{.items[*].spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchFields[0].values[0]}')" == node-1 ]]
}
wait_until "daemonset pod created for node-1" ds_pod_for_node
ds_pod="$(k get pods -n smoke -l app=agent -o jsonpath='{.items[0].metadata.name}')"
api -X POST -H 'Content-Type: application/json' \
  "$APISERVER_URL/api/v1/namespaces/smoke/pods/$ds_pod/binding" \
  -d '{"apiVersion":"v1","kind":"Binding","metadata":{"name":"'"$ds_pod"'"},"target":{"kind":"Node","name":"node-1"}}' \
  >/dev/null
expect "daemonset pod bound" "$(k get pod -n smoke "$ds_pod" -o jsonpath='{.spec.nodeName}')" node-1

# A token for the pod's identity, bound to the pod, as ztunnel would present
# to the CA; then the CA's check of it.
token="$(k create token reviews -n smoke --audience=istio-ca \
  --bound-object-kind=Pod --bound-object-name=reviews-1 --duration=1h)"
[[ -n "$token" ]] || { log "FAIL: empty token"; exit 1; }

# review TOKEN AUDIENCE: the TokenReview status, as JSON.
review() {
  jq -n --arg t "$1" --arg a "$2" \
    '{apiVersion:"authentication.k8s.io/v1",kind:"TokenReview",spec:{token:$t,audiences:[$a]}}' \
    | api -X POST -H 'Content-Type: application/json' --data-binary @- \
      "$APISERVER_URL/apis/authentication.k8s.io/v1/tokenreviews" \
    | jq -c .status
}
who() { jq -r '"\(.authenticated // false) \(.user.username // "")"'; }

status="$(review "$token" istio-ca)"
expect "token review (audience istio-ca)" "$(who <<<"$status")" \
  "true system:serviceaccount:smoke:reviews"
# The bound pod and its node travel with the token: the CA checks the node.
expect "token bound to" \
  "$(jq -r '.user.extra["authentication.kubernetes.io/pod-name"][0] + " " + .user.extra["authentication.kubernetes.io/node-name"][0]' <<<"$status")" \
  "reviews-1 node-1"
expect "token review (wrong audience)" "$(review "$token" someone-else | who)" "false "

# Deleting the pod revokes its bound token.
k delete pod -n smoke reviews-1 --grace-period=0 --force >&2 2>/dev/null || true
k wait --for=delete pod/reviews-1 -n smoke --timeout=30s >&2 || true
# The API server looks the pod up through a cache, so allow it a moment.
for _ in $(seq 1 50); do
  [[ "$(review "$token" istio-ca | who)" == "false " ]] && break
  sleep 0.2
done
expect "token review after pod deletion" "$(review "$token" istio-ca | who)" "false "

# The namespace controller empties and removes a deleted namespace. Pods
# bound to a node wait for their kubelet to confirm they stopped; confirm it
# the way a kubelet does, by deleting them with no grace period.
k delete namespace smoke --wait=false >&2
ns_gone() {
  k delete pods -n smoke --all --grace-period=0 --force >/dev/null 2>&1 || true
  ! k get namespace smoke
}
wait_until "namespace deleted" ns_gone

log "smoke passed in $((SECONDS - t0))s"
