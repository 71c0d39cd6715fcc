#!/usr/bin/env bash
# Start etcd, kube-apiserver and (unless KUBE_CONTROLLERS=none) a
# kube-controller-manager on 127.0.0.1 with state in DIR:
#   e2e/kube/start.sh DIR
# Writes DIR/kubeconfig (cluster admin, system:masters) and DIR/env (KEY=VALUE
# lines: pids, ports, paths), then prints both paths. Stop with stop.sh DIR.
#
# Environment (all optional):
#   KUBE_BIN             directory with the binaries (default: output of build.sh)
#   ETCD_PORT            etcd client port       (default: a free port)
#   ETCD_PEER_PORT       etcd peer port         (default: a free port)
#   APISERVER_PORT       kube-apiserver port    (default: a free port)
#   SA_ISSUER            service-account token issuer
#                        (default: https://kubernetes.default.svc.cluster.local)
#   API_AUDIENCES        comma-separated audiences the API server accepts
#                        (default: $SA_ISSUER)
#   KUBE_CONTROLLERS     comma-separated kube-controller-manager controllers,
#                        or "none" to not run it (default: $default_controllers
#                        below: service accounts, namespace deletion, garbage
#                        collection, EndpointSlices, Deployments/ReplicaSets/
#                        DaemonSets; there is no scheduler and no kubelet)
#   KUBE_EXTRA_CONTROLLERS  comma-separated controllers added to that list
#                        (e2e/cluster adds node-lifecycle-controller and
#                        pod-garbage-collector-controller for its real nodes)
#   KUBE_SCHEDULER       1 to also run a kube-scheduler (default: 0; tests
#                        without kubelets bind pods themselves)
#   KUBE_READY_TIMEOUT   seconds to wait for each component (default: 120)
#
# Certificates and keys in DIR/pki are generated once and reused on restart, so
# tokens issued before a restart stay valid; etcd data in DIR/etcd is kept too.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $# -eq 1 ]] || die "usage: $0 DIR"
mkdir -p "$1"
dir="$(cd "$1" && pwd)"
# DIR/env is plain KEY=VALUE without quoting so that any language can read it.
[[ "$dir" =~ ^[A-Za-z0-9_./+-]+$ ]] || die "DIR must not contain spaces or shell characters: $dir"

if [[ -f "$dir/env" ]]; then
  for pid in $(sed -n 's/^[A-Z_]*_PID=//p' "$dir/env"); do
    if tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF -- "$dir/"; then
      die "already running in $dir (pid $pid); run stop.sh $dir first"
    fi
  done
fi

bin="${KUBE_BIN:-$("$KUBE_DIR/build.sh")}"
for b in etcd kube-apiserver; do [[ -x "$bin/$b" ]] || die "missing $bin/$b"; done

sa_issuer="${SA_ISSUER:-https://kubernetes.default.svc.cluster.local}"
api_audiences="${API_AUDIENCES:-$sa_issuer}"
ready_timeout="${KUBE_READY_TIMEOUT:-120}"
default_controllers="serviceaccount-controller,namespace-controller,garbage-collector-controller"
default_controllers+=",endpointslice-controller,endpointslice-mirroring-controller"
default_controllers+=",root-ca-certificate-publisher-controller,clusterrole-aggregation-controller"
default_controllers+=",deployment-controller,replicaset-controller,daemonset-controller"
controllers="${KUBE_CONTROLLERS:-$default_controllers}"
[[ -z "${KUBE_EXTRA_CONTROLLERS:-}" || "$controllers" == none ]] \
  || controllers+=",$KUBE_EXTRA_CONTROLLERS"
scheduler="${KUBE_SCHEDULER:-0}"
[[ "$scheduler" == 0 ]] || [[ -x "$bin/kube-scheduler" ]] || die "missing $bin/kube-scheduler"
[[ "$controllers" == none ]] || [[ -x "$bin/kube-controller-manager" ]] \
  || die "missing $bin/kube-controller-manager"

# ---------------------------------------------------------------- ports

# A port nobody listens on now, outside the ephemeral range so that outgoing
# connections do not take it before we bind. Ports already chosen are skipped.
# (Another process may still bind it first; start.sh then fails and says so.)
taken=()
free_port() {
  local p i
  for i in $(seq 1 200); do
    p=$((20000 + RANDOM % 12000))
    [[ " ${taken[*]-} " == *" $p "* ]] && continue
    if [[ -z "$(ss -Hltn "sport = :$p")" ]]; then
      printf '%s\n' "$p"
      return 0
    fi
  done
  die "no free port found"
}
etcd_port="${ETCD_PORT:-$(free_port)}"
taken+=("$etcd_port")
etcd_peer_port="${ETCD_PEER_PORT:-$(free_port)}"
taken+=("$etcd_peer_port")
apiserver_port="${APISERVER_PORT:-$(free_port)}"

# ---------------------------------------------------------------- pki

pki="$dir/pki"
mkdir -p "$pki"
chmod 700 "$pki"

# sign NAME SUBJECT EXTENSIONS: a P-256 key and a certificate from our CA.
sign() {
  local name="$1" subject="$2" ext="$3"
  openssl ecparam -name prime256v1 -genkey -noout -out "$pki/$name.key" 2>/dev/null
  openssl req -new -key "$pki/$name.key" -subj "$subject" -out "$pki/$name.csr"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -CAcreateserial -days 3650 -sha256 -out "$pki/$name.crt" \
    -extfile <(printf '%s\n' "$ext") 2>/dev/null
  rm -f "$pki/$name.csr"
}

if [[ ! -f "$pki/admin.crt" ]]; then
  log "generating certificates and keys in $pki"
  openssl ecparam -name prime256v1 -genkey -noout -out "$pki/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$pki/ca.key" -subj "/CN=ambit-e2e-kube-ca" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$pki/ca.crt"
  # The service names let in-cluster style clients verify the server too.
  sign apiserver "/CN=kube-apiserver" "$(printf '%s\n' \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local")"
  sign admin "/O=system:masters/CN=ambit-e2e-admin" "$(printf '%s\n' \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=clientAuth")"
  # Service-account tokens are RS256, the algorithm every cluster uses.
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key" 2>/dev/null
  openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
fi

# ---------------------------------------------------------------- processes

etcd_pid=""
apiserver_pid=""
controller_manager_pid=""
scheduler_pid=""
# On any failure, stop what this script started and show why it failed.
cleanup_on_error() {
  local rc=$?
  [[ -n "$scheduler_pid" ]] && kill "$scheduler_pid" 2>/dev/null || true
  [[ -n "$controller_manager_pid" ]] && kill "$controller_manager_pid" 2>/dev/null || true
  [[ -n "$apiserver_pid" ]] && kill "$apiserver_pid" 2>/dev/null || true
  [[ -n "$etcd_pid" ]] && kill "$etcd_pid" 2>/dev/null || true
  for f in etcd.log kube-apiserver.log kube-controller-manager.log kube-scheduler.log; do
    [[ -f "$dir/$f" ]] && { log "last lines of $dir/$f:"; tail -n 20 "$dir/$f" >&2; }
  done
  exit "$rc"
}
trap cleanup_on_error ERR

# wait_for WHAT SECONDS PID CMD...: poll CMD until it succeeds, the process
# dies, or the time runs out.
wait_for() {
  local what="$1" timeout="$2" pid="$3" deadline=$((SECONDS + $2))
  shift 3
  until "$@" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || { log "$what exited"; return 1; }
    ((SECONDS < deadline)) || { log "$what not ready after ${timeout}s"; return 1; }
    sleep 0.2
  done
}

# Children get their own stdio so a caller reading our stdout sees EOF when
# this script exits. fsync is off: the data is thrown away after the tests.
log "starting etcd on 127.0.0.1:$etcd_port"
"$bin/etcd" \
  --name=ambit-e2e \
  --data-dir="$dir/etcd" \
  --listen-client-urls="http://127.0.0.1:$etcd_port" \
  --advertise-client-urls="http://127.0.0.1:$etcd_port" \
  --listen-peer-urls="http://127.0.0.1:$etcd_peer_port" \
  --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer_port" \
  --initial-cluster="ambit-e2e=http://127.0.0.1:$etcd_peer_port" \
  --unsafe-no-fsync=true \
  --log-level=warn \
  </dev/null >"$dir/etcd.log" 2>&1 &
etcd_pid=$!
wait_for etcd 30 "$etcd_pid" curl -fsS "http://127.0.0.1:$etcd_port/health"

log "starting kube-apiserver on https://127.0.0.1:$apiserver_port"
# --endpoint-reconciler-type=none: the default/kubernetes Endpoints would
# point at 127.0.0.1, which Endpoints validation rejects over and over.
# The --kubelet-* flags matter only with real kubelets (e2e/cluster): the
# API server authenticates to them as admin for exec/logs/port-forward,
# checks their serving certificates against our CA, and dials their
# InternalIP (node names resolve nowhere).
"$bin/kube-apiserver" \
  --bind-address=127.0.0.1 \
  --advertise-address=127.0.0.1 \
  --secure-port="$apiserver_port" \
  --etcd-servers="http://127.0.0.1:$etcd_port" \
  --etcd-prefix=/registry \
  --client-ca-file="$pki/ca.crt" \
  --tls-cert-file="$pki/apiserver.crt" \
  --tls-private-key-file="$pki/apiserver.key" \
  --service-account-issuer="$sa_issuer" \
  --service-account-key-file="$pki/sa.pub" \
  --service-account-signing-key-file="$pki/sa.key" \
  --api-audiences="$api_audiences" \
  --authorization-mode=RBAC \
  --service-cluster-ip-range=10.96.0.0/16 \
  --endpoint-reconciler-type=none \
  --allow-privileged=true \
  --kubelet-client-certificate="$pki/admin.crt" \
  --kubelet-client-key="$pki/admin.key" \
  --kubelet-certificate-authority="$pki/ca.crt" \
  --kubelet-preferred-address-types=InternalIP \
  --profiling=false \
  </dev/null >"$dir/kube-apiserver.log" 2>&1 &
apiserver_pid=$!

curl_admin=(curl -fsS --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key")
wait_for kube-apiserver "$ready_timeout" "$apiserver_pid" \
  "${curl_admin[@]}" "https://127.0.0.1:$apiserver_port/readyz"

# ---------------------------------------------------------------- outputs

b64() { base64 -w0 <"$1"; }
cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: ambit-e2e
  cluster:
    server: https://127.0.0.1:$apiserver_port
    certificate-authority-data: $(b64 "$pki/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(b64 "$pki/admin.crt")
    client-key-data: $(b64 "$pki/admin.key")
contexts:
- name: ambit-e2e
  context:
    cluster: ambit-e2e
    user: admin
current-context: ambit-e2e
EOF
chmod 600 "$dir/kubeconfig"

# ---------------------------------------------------------------- controllers

if [[ "$controllers" != none ]]; then
  log "starting kube-controller-manager ($controllers)"
  # It talks to the API server as cluster admin; it serves nothing (port 0).
  "$bin/kube-controller-manager" \
    --kubeconfig="$dir/kubeconfig" \
    --controllers="$controllers" \
    --leader-elect=false \
    --secure-port=0 \
    --root-ca-file="$pki/ca.crt" \
    --profiling=false \
    </dev/null >"$dir/kube-controller-manager.log" 2>&1 &
  controller_manager_pid=$!
  # Ready once a controller has acted: the default namespace's service account.
  if [[ ",$controllers," == *,serviceaccount-controller,* ]]; then
    wait_for kube-controller-manager "$ready_timeout" "$controller_manager_pid" \
      "${curl_admin[@]}" "https://127.0.0.1:$apiserver_port/api/v1/namespaces/default/serviceaccounts/default"
  else
    sleep 1
    kill -0 "$controller_manager_pid" 2>/dev/null || { log "kube-controller-manager exited"; false; }
  fi
fi

# ---------------------------------------------------------------- scheduler

if [[ "$scheduler" != 0 ]]; then
  log "starting kube-scheduler"
  # Admin credentials, no leader election, nothing served (port 0).
  "$bin/kube-scheduler" \
    --kubeconfig="$dir/kubeconfig" \
    --leader-elect=false \
    --secure-port=0 \
    --profiling=false \
    </dev/null >"$dir/kube-scheduler.log" 2>&1 &
  scheduler_pid=$!
  sleep 1
  kill -0 "$scheduler_pid" 2>/dev/null || { log "kube-scheduler exited"; false; }
fi

# ---------------------------------------------------------------- env

cat >"$dir/env" <<EOF
KUBE_BIN=$bin
KUBECONFIG=$dir/kubeconfig
APISERVER_URL=https://127.0.0.1:$apiserver_port
APISERVER_PORT=$apiserver_port
APISERVER_PID=$apiserver_pid
ETCD_URL=http://127.0.0.1:$etcd_port
ETCD_PORT=$etcd_port
ETCD_PEER_PORT=$etcd_peer_port
ETCD_PID=$etcd_pid
CONTROLLER_MANAGER_PID=$controller_manager_pid
SCHEDULER_PID=$scheduler_pid
CA_CERT=$pki/ca.crt
ADMIN_CERT=$pki/admin.crt
ADMIN_KEY=$pki/admin.key
SA_ISSUER=$sa_issuer
SA_PUBLIC_KEY=$pki/sa.pub
EOF

trap - ERR
log "kube-apiserver ready at https://127.0.0.1:$apiserver_port (pid $apiserver_pid)," \
  "etcd pid $etcd_pid, kube-controller-manager pid ${controller_manager_pid:-none}," \
  "kube-scheduler pid ${scheduler_pid:-none}"
printf 'kubeconfig: %s\nenv: %s\n' "$dir/kubeconfig" "$dir/env"
