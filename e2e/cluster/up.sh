#!/usr/bin/env bash
# Start a two-node Kubernetes cluster on this machine from real parts:
#   e2e/cluster/up.sh DIR
# the control plane of e2e/kube/start.sh (plus kube-scheduler) on 127.0.0.1,
# then node1 and node2, each in its own network and mount namespace with its
# own containerd, kubelet and kube-proxy, pods on the reference CNI bridge.
# Writes DIR/kubeconfig (cluster admin) and DIR/env (every pid and resource,
# appended as it is made); stop with e2e/cluster/down.sh DIR, which also runs
# when this script fails halfway. See README.md.
#
# Opt-in: AMBIT_CLUSTER_DNS=1 adds cluster DNS (CoreDNS as a Deployment in
# kube-system behind the Service kube-dns at 10.96.0.10, the kubelets'
# clusterDNS). Its image is the OCI tar AMBIT_COREDNS_TAR, by default the one
# e2e/gateway-conformance/build.sh builds (cached). Without it nothing changes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $# -eq 1 ]] || die "usage: $0 DIR"
set_cluster_dir "$1"
[[ ! -f "$ENV_FILE" ]] || die "$ENV_FILE exists: run $CLUSTER_DIR_SRC/down.sh $CLUSTER_DIR first"
CLUSTER_DNS="${AMBIT_CLUSTER_DNS:-0}"
[[ "$CLUSTER_DNS" == 0 || "$CLUSTER_DNS" == 1 ]] || die "AMBIT_CLUSTER_DNS must be 0 or 1"
NODE_IMAGES=(pause busybox)
((CLUSTER_DNS == 0)) || NODE_IMAGES+=(coredns)

# ---------------------------------------------------------------- checks

check_prerequisites() {
  local c missing
  missing="$(missing_prerequisites)"
  [[ -z "$missing" ]] || die "missing: $missing (scripts/install-deps.sh installs the packages)"
  ! ip link show "$BRIDGE" >/dev/null 2>&1 \
    || die "bridge $BRIDGE exists: another cluster is up; run down.sh on its DIR"
  # The nodes see their own /run, /var/lib, /var/log: what lives there on the
  # host is invisible to them.
  for c in "${NODE_PRIVATE_DIRS[@]}"; do
    [[ "$CLUSTER_DIR/" != "$c/"* ]] || die "DIR must not be under $c (hidden inside the nodes)"
  done
  # Unix socket paths are limited to 108 bytes.
  ((${#CLUSTER_DIR} < 60)) || die "DIR path too long for unix sockets: $CLUSTER_DIR"
}

# ---------------------------------------------------------------- sysctls

save_sysctls() {
  local f="$CLUSTER_DIR/sysctls.saved"
  sysctl "${KUBELET_SYSCTLS[@]}" | tr -d ' ' >"$f.tmp"
  mv "$f.tmp" "$f"
  record SYSCTLS_SAVED "$f"
}


# ---------------------------------------------------------------- images

# The sandbox (pause) image and a busybox test image, written with
# scripts/oci-image.py; ctr imports them into every node.
build_images() {
  local d="$CLUSTER_DIR/images" a applets=()
  mkdir -p "$d"
  gcc -static -O2 -s -Wall -o "$d/pause" "$CLUSTER_DIR_SRC/pause.c"
  python3 "$REPO_DIR/scripts/oci-image.py" --name "$PAUSE_IMAGE" --output "$d/pause.tar" \
    --add "$d/pause:/pause" --entrypoint /pause
  # Debian's static busybox; every applet a symlink so `sh`, `nc`, ... work.
  for a in $(/bin/busybox --list); do
    [[ "$a" == busybox ]] || applets+=(--symlink "/bin/$a:busybox")
  done
  python3 "$REPO_DIR/scripts/oci-image.py" --name "$BUSYBOX_IMAGE" --output "$d/busybox.tar" \
    --add /bin/busybox:/bin/busybox "${applets[@]}" --dir /tmp:1777 \
    --env PATH=/bin --cmd /bin/sh
  if ((CLUSTER_DNS)); then
    local tar="${AMBIT_COREDNS_TAR:-}"
    [[ -n "$tar" ]] || tar="$("$REPO_DIR/e2e/gateway-conformance/build.sh")/coredns.tar"
    [[ -s "$tar" ]] || die "no CoreDNS image tar: $tar"
    cp "$tar" "$d/coredns.tar"
    COREDNS_IMAGE="$(tar -xOf "$d/coredns.tar" index.json | jq -r '.manifests[0].annotations["io.containerd.image.name"]')"
    [[ -n "$COREDNS_IMAGE" && "$COREDNS_IMAGE" != null ]] || die "$tar names no image"
  fi
}

# ---------------------------------------------------------------- control plane

start_control_plane() {
  local control="$CLUSTER_DIR/control"
  record CONTROL_DIR "$control"
  # A fresh etcd every time: objects of an earlier cluster would collide.
  rm -rf "$control/etcd"
  KUBE_BIN="$KUBE_BIN" KUBE_SCHEDULER=1 \
    KUBE_EXTRA_CONTROLLERS=node-lifecycle-controller,pod-garbage-collector-controller \
    "$KUBE_SRC/start.sh" "$control" >/dev/null
  APISERVER_PORT="$(sed -n 's/^APISERVER_PORT=//p' "$control/env")"
  cp "$control/kubeconfig" "$CLUSTER_DIR/kubeconfig"
  record KUBECONFIG "$CLUSTER_DIR/kubeconfig"
  record APISERVER_PORT "$APISERVER_PORT"
}

kubectl() { "$KUBE_BIN/kubectl" --kubeconfig="$CLUSTER_DIR/kubeconfig" "$@"; }

# What a cluster installer would add: the nodes' permissions (RBAC only; no
# Node authorizer) and endpoints for default/kubernetes at the forwarder, so
# pods reach the API server with in-cluster config (10.96.0.1:443).
apply_cluster_objects() {
  kubectl apply --server-side --field-manager=ambit-e2e-cluster -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: ambit-e2e:nodes
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: system:node}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: Group, name: system:nodes}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: ambit-e2e:node-proxiers
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: system:node-proxier}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: Group, name: system:nodes}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes-ambit-e2e
  namespace: default
  labels:
    kubernetes.io/service-name: kubernetes
    endpointslice.kubernetes.io/managed-by: ambit-e2e-cluster
addressType: IPv4
endpoints:
- addresses: ["$BRIDGE_IP"]
  conditions: {ready: true}
ports:
- {name: https, port: $APISERVER_PORT, protocol: TCP}
EOF
}

# ---------------------------------------------------------------- host network

# The bridge the nodes hang off, and the API server forwarded onto it: the
# API server listens on 127.0.0.1, which no node namespace can reach.
host_network() {
  record BRIDGE "$BRIDGE"
  # A fixed MAC: by default a bridge takes the lowest MAC of its ports, so it
  # changes when a node's veth goes, and the other nodes' ARP entries for
  # the host go stale (their packets, FINs included, vanish for a while).
  ip link add "$BRIDGE" address 02:00:0a:fa:00:01 type bridge
  ip addr add "$BRIDGE_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  socat -lf "$CLUSTER_DIR/socat.log" \
    "TCP-LISTEN:$APISERVER_PORT,bind=$BRIDGE_IP,reuseaddr,fork" "TCP:127.0.0.1:$APISERVER_PORT" \
    </dev/null >/dev/null 2>&1 &
  record FORWARDER_PID $!
  wait_until "API forwarder on $BRIDGE_IP:$APISERVER_PORT" 10 \
    curl -fsS --cacert "$CLUSTER_DIR/control/pki/ca.crt" --resolve "localhost:$APISERVER_PORT:$BRIDGE_IP" \
    "https://localhost:$APISERVER_PORT/livez"
}

# ---------------------------------------------------------------- one node

# Network: eth0 on the host bridge, forwarding on (in its own namespace),
# routes to the other nodes' pods; the host routes each node's pods to it.
node_network() { # NODE
  local n="$1" ns ip other
  ns="$(node_netns "$n")"
  ip="$(node_ip "$n")"
  record "$(env_key "$n" NETNS)" "$ns"
  ip netns add "$ns"
  record "$(env_key "$n" VETH)" "$ns"
  ip link add "$ns" type veth peer name eth0 netns "$ns"
  ip link set "$ns" master "$BRIDGE" up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$ip/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route add default via "$BRIDGE_IP"
  nsenter --net="/run/netns/$ns" sysctl -qw net.ipv4.ip_forward=1
  for other in "${NODES[@]}"; do
    [[ "$other" == "$n" ]] && continue
    ip -n "$ns" route add "$(node_pod_cidr "$other")" via "$(node_ip "$other")"
  done
  record "$(env_key "$n" HOST_ROUTE)" "$(node_pod_cidr "$n")"
  ip route add "$(node_pod_cidr "$n")" via "$ip" dev "$BRIDGE"
}

# The kubelet's cgroupRoot, in every cgroup v1 hierarchy (cpuset needs its
# cpus and mems filled before anything can join).
node_cgroups() { # NODE
  local cg h
  cg="$(node_cgroup "$1")"
  record "$(env_key "$1" CGROUP)" "$cg"
  for h in $(awk '$3 == "cgroup" { print $2 }' /proc/mounts); do
    mkdir -p "$h/$cg"
  done
  cat /sys/fs/cgroup/cpuset/cpuset.cpus >"/sys/fs/cgroup/cpuset/$cg/cpuset.cpus"
  cat /sys/fs/cgroup/cpuset/cpuset.mems >"/sys/fs/cgroup/cpuset/$cg/cpuset.mems"
}

# Client certificate (the node's identity: group system:nodes), serving
# certificate for its IP (the API server checks it), and its kubeconfig,
# which reaches the API server through the forwarder; the server's
# certificate names localhost, not the bridge address.
node_credentials() { # NODE
  local n="$1" d pki
  d="$(node_dir "$n")"
  pki="$d/pki"
  mkdir -p "$pki"
  chmod 700 "$pki"
  sign_cert "$pki" client "/O=system:nodes/CN=system:node:$n" "$(printf '%s\n' \
    "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=clientAuth")"
  sign_cert "$pki" serving "/CN=$n" "$(printf '%s\n' \
    "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" "subjectAltName=IP:$(node_ip "$n"),DNS:$n")"
  cat >"$d/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: ambit-e2e
  cluster:
    server: https://$BRIDGE_IP:$APISERVER_PORT
    certificate-authority: $CLUSTER_DIR/control/pki/ca.crt
    tls-server-name: localhost
users:
- name: $n
  user:
    client-certificate: $pki/client.crt
    client-key: $pki/client.key
contexts:
- name: ambit-e2e
  context: {cluster: ambit-e2e, user: $n}
current-context: ambit-e2e
EOF
}

# The primary CNI network: the reference bridge + host-local + portmap
# plugins. The bin dir holds links to /usr/lib/cni/* so that Ambit's plugin
# can be dropped next to them and chained after portmap in the conflist.
node_cni() { # NODE
  local n="$1" d p idx
  d="$(node_dir "$n")/cni"
  idx="$(node_index "$n")"
  mkdir -p "$d/bin" "$d/net.d" "$d/ipam"
  for p in /usr/lib/cni/*; do ln -sfn "$p" "$d/bin/$(basename "$p")"; done
  cat >"$d/net.d/10-ambit-e2e.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "ambit-e2e",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.244.$idx.0/24", "gateway": "10.244.$idx.1"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$d/ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
}

# containerd: everything it writes under the node's directory. OOM score
# adjustments are restricted because this VM denies lowering them (runc
# fails "can't get final child's PID from pipe" otherwise).
node_containerd_config() { # NODE
  local d c
  d="$(node_dir "$1")"
  c="$d/containerd"
  mkdir -p "$c"
  cat >"$d/containerd.toml" <<EOF
version = 2
root = "$c/root"
state = "$c/state"
oom_score = 0
# Snapshotters that cannot work here (and aufs would try modprobe).
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "$c/containerd.sock"
[ttrpc]
  address = "$c/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "$c/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        Root = "$c/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$d/cni/bin"
    conf_dir = "$d/cni/net.d"
    max_conf_num = 1
EOF
}

# kubelet: cgroupfs driver under its own cgroupRoot; cgroup v1 accepted; no
# oom_score_adj (see containerd); x509 + webhook authentication, serving
# certificate from our CA; every directory of its own; eviction and image GC
# thresholds so that a shared, busy disk evicts nothing.
node_kubelet_config() { # NODE
  local n="$1" d
  d="$(node_dir "$n")"
  mkdir -p "$d/kubelet" "$d/pod-logs" "$d/volume-plugins"
  cat >"$d/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $(node_ip "$n")
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $CLUSTER_DIR/control/pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $d/pki/serving.crt
tlsPrivateKeyFile: $d/pki/serving.key
containerRuntimeEndpoint: unix://$(containerd_sock "$n")
cgroupDriver: cgroupfs
cgroupRoot: /$(node_cgroup "$n")
failCgroupV1: false
failSwapOn: false
oomScoreAdj: 0
podLogsDir: $d/pod-logs
volumePluginDir: $d/volume-plugins
clusterDomain: cluster.local
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, nodefs.inodesFree: 1%, imagefs.available: 1%}
imageGCHighThresholdPercent: 99
imageGCLowThresholdPercent: 98
serializeImagePulls: false
EOF
  ((CLUSTER_DNS == 0)) || echo "clusterDNS: [$CLUSTER_DNS_IP]" >>"$d/kubelet.yaml"
}

# kube-proxy: iptables mode inside the node's namespace; conntrack settings
# all zero so that it leaves the machine-wide nf_conntrack sysctls alone.
node_kube_proxy_config() { # NODE
  local n="$1" d
  d="$(node_dir "$n")"
  cat >"$d/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $d/kubeconfig}
hostnameOverride: $n
bindAddress: $(node_ip "$n")
mode: iptables
clusterCIDR: $POD_CIDR
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
EOF
}

# The standard CNI directories exist on the host as empty mount points for
# the nodes' own (see node_mount_namespace); up.sh creates those missing and
# records them, down.sh removes them (when still empty).
host_cni_mount_points() {
  local d top created=()
  for d in "${NODE_CNI_DIRS[@]}"; do
    [[ -d "$d" ]] && continue
    top="$d"
    while [[ ! -e "$(dirname "$top")" ]]; do top="$(dirname "$top")"; done
    created+=("$top")
  done
  ((${#created[@]})) || return 0
  record CREATED_HOST_DIRS "$(IFS=,; echo "${created[*]}")"
  mkdir -p "${NODE_CNI_DIRS[@]}"
}

# The node's mount namespace, pinned on DIR/ns/NODE.mnt (DIR/ns is a private
# bind mount, as pinning requires). Inside it the node gets its own /run,
# /var/lib and /var/log, and drops the copies of the host's namespace pins
# (/run/netns/*), which would otherwise keep those namespaces alive. The
# node's CNI bin and conf dirs (DIR/nodes/N/cni/{bin,net.d}, which its
# containerd reads) are bind-mounted on /opt/cni/bin and /etc/cni/net.d, so a
# DaemonSet's hostPath volumes of those standard paths (Ambit's node agent)
# reach them with the production manifests unchanged. / and /run are made
# shared inside the node (peer groups of the node's own; the host is not in
# them), as on a systemd machine: containerd accepts a hostPath of
# /var/run/netns with HostToContainer propagation only on a shared or slave
# mount (it looks the path up without following the /var/run symlink, so /
# counts too), and the pods' namespace pins made later under /run reach it.
node_mount_namespace() { # NODE
  local n="$1" pin fs d cni
  pin="$(node_mntns_pin "$n")"
  fs="$(node_dir "$n")/fs"
  cni="$(node_dir "$n")/cni"
  if [[ -z "$(env_get NS_BIND)" ]]; then
    mkdir -p "$CLUSTER_DIR/ns"
    record NS_BIND "$CLUSTER_DIR/ns"
    mount --bind "$CLUSTER_DIR/ns" "$CLUSTER_DIR/ns"
    mount --make-private "$CLUSTER_DIR/ns"
  fi
  for d in "${NODE_PRIVATE_DIRS[@]}"; do mkdir -p "$fs$d"; done
  touch "$pin"
  record "$(env_key "$n" MNTNS)" "$pin"
  # shellcheck disable=SC2016
  unshare --mount="$pin" --propagation private -- bash -euc '
    fs="$1"
    awk '\''{ for (i = 7; i <= NF; i++) if ($i == "-") { if ($(i + 1) == "nsfs") print $5; break } }'\'' \
      /proc/self/mountinfo | sort -ru | while read -r m; do umount -l "$m"; done
    cni="$2"
    shift 2
    for d in "$@"; do mount --bind "$fs$d" "$d"; done
    mount --make-shared /
    mount --make-rshared /run
    mount --bind "$cni/bin" /opt/cni/bin
    mount --bind "$cni/net.d" /etc/cni/net.d
  ' _ "$fs" "$cni" "${NODE_PRIVATE_DIRS[@]}"
  record "$(env_key "$n" MNTNS_INO)" "$(stat -L -c %i "$pin")"
}

# start_daemon NODE NAME CMD...: start CMD in the node's network and mount
# namespaces, log to DIR/nodes/NODE/NAME.log, record its pid as NODEN_NAME_PID.
# The subshell execs nsenter, which execs CMD: $! is CMD's own pid, which
# down.sh signals.
start_daemon() {
  local n="$1" name="$2" pid key log
  shift 2
  log="$(node_dir "$n")/$name.log"
  (exec nsenter --net="/run/netns/$(node_netns "$n")" --mount="$(node_mntns_pin "$n")" -- "$@") \
    </dev/null >"$log" 2>&1 &
  pid=$!
  key="$(env_key "$n" "${name^^}_PID")"
  record "${key//-/_}" "$pid"
  sleep 0.2
  kill -0 "$pid" 2>/dev/null || { tail -n 20 "$log" >&2; die "$n: $name exited at once"; }
  [[ "$(basename "$(readlink "/proc/$pid/exe")")" == "$(basename "$1")" ]] \
    || die "bug: pid $pid is $(readlink "/proc/$pid/exe"), not $1"
}

start_node() { # NODE
  local n="$1" d sock img
  d="$(node_dir "$n")"
  sock="$(containerd_sock "$n")"
  start_daemon "$n" containerd containerd --config "$d/containerd.toml"
  wait_until "$n: containerd" 30 ctr --address "$sock" version
  for img in "${NODE_IMAGES[@]}"; do
    ctr --address "$sock" -n k8s.io images import "$CLUSTER_DIR/images/$img.tar" >/dev/null
  done
  start_daemon "$n" kubelet "$KUBE_BIN/kubelet" --config="$d/kubelet.yaml" \
    --kubeconfig="$d/kubeconfig" --hostname-override="$n" --node-ip="$(node_ip "$n")" \
    --root-dir="$d/kubelet" --cert-dir="$d/pki" --v=1
  start_daemon "$n" kube-proxy "$KUBE_BIN/kube-proxy" --config="$d/kube-proxy.yaml" --v=1
}

make_node() { # NODE
  local n="$1"
  log "$n: $(node_ip "$n"), pods $(node_pod_cidr "$n"), netns $(node_netns "$n")"
  mkdir -p "$(node_dir "$n")"
  node_network "$n"
  node_cgroups "$n"
  node_credentials "$n"
  node_cni "$n"
  node_containerd_config "$n"
  node_kubelet_config "$n"
  node_kube_proxy_config "$n"
  node_mount_namespace "$n"
  start_node "$n"
}

node_ready() { # NODE
  [[ "$(kubectl get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" == True ]]
}

# ---------------------------------------------------------------- cluster DNS (opt-in)

# CoreDNS in kube-system behind kube-dns (10.96.0.10), as kubeadm installs it:
# the kubernetes plugin (in-cluster config through default/kubernetes),
# ready, cache; no forward (nothing outside the machine is reachable).
cluster_dns() {
  kubectl apply --server-side --field-manager=ambit-e2e-cluster -f - >/dev/null <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: ambit-e2e:coredns}
rules:
- {apiGroups: [""], resources: [services, pods, namespaces], verbs: [list, watch]}
- {apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: ambit-e2e:coredns}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: ambit-e2e:coredns}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
    .:53 {
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
        }
        cache 30
        loadbalance
    }
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      dnsPolicy: Default
      terminationGracePeriodSeconds: 1
      tolerations: [{operator: Exists}]
      containers:
      - name: coredns
        image: $COREDNS_IMAGE
        imagePullPolicy: IfNotPresent
        args: [-conf, /etc/coredns/Corefile]
        ports:
        - {name: dns, containerPort: 53, protocol: UDP}
        - {name: dns-tcp, containerPort: 53, protocol: TCP}
        readinessProbe: {httpGet: {path: /ready, port: 8181}, periodSeconds: 2}
        volumeMounts: [{name: config, mountPath: /etc/coredns, readOnly: true}]
      volumes: [{name: config, configMap: {name: coredns}}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $CLUSTER_DNS_IP
  selector: {k8s-app: kube-dns}
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
EOF
  record CLUSTER_DNS "$CLUSTER_DNS_IP"
  wait_until "CoreDNS Available" 120 dns_available
}
dns_available() {
  [[ "$(kubectl get deploy -n kube-system coredns -o jsonpath='{.status.conditions[?(@.type=="Available")].status}')" == True ]]
}

# ---------------------------------------------------------------- main

up_ok=0
on_exit() {
  local rc=$? f
  ((up_ok)) && return 0
  log "up failed (exit $rc); last log lines:"
  for f in "$CLUSTER_DIR"/control/*.log "$CLUSTER_DIR"/nodes/*/*.log; do
    [[ -s "$f" ]] && { log "--- $f"; tail -n 8 "$f" >&2; }
  done
  log "tearing down what was started"
  "$CLUSTER_DIR_SRC/down.sh" "$CLUSTER_DIR" || log "down.sh failed too: see above"
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM   # so that on_exit tears down on Ctrl-C too

t0=$SECONDS
check_prerequisites
KUBE_BIN="$("$KUBE_SRC/build.sh")"
for b in kubelet kube-proxy kube-scheduler kubectl; do [[ -x "$KUBE_BIN/$b" ]] || die "missing $KUBE_BIN/$b"; done
for d in "${NODE_PRIVATE_DIRS[@]}"; do
  [[ "$KUBE_BIN/" != "$d/"* ]] || die "KUBE_BIN must not be under $d (hidden inside the nodes)"
done
record CLUSTER_DIR "$CLUSTER_DIR"
record KUBE_BIN "$KUBE_BIN"
record NODES "$(IFS=,; echo "${NODES[*]}")"
save_sysctls
build_images
start_control_plane
log "control plane up after $((SECONDS - t0))s (API server port $APISERVER_PORT)"
host_network
apply_cluster_objects
host_cni_mount_points
for n in "${NODES[@]}"; do make_node "$n"; done
for n in "${NODES[@]}"; do wait_until "$n Ready" 120 node_ready "$n"; done
restore_sysctls "$CLUSTER_DIR/sysctls.saved"
if ((CLUSTER_DNS)); then
  cluster_dns
  log "cluster DNS: CoreDNS ($COREDNS_IMAGE) Available at $CLUSTER_DNS_IP after $((SECONDS - t0))s"
fi
up_ok=1
log "cluster up in $((SECONDS - t0))s: nodes ${NODES[*]} Ready; KUBECONFIG=$CLUSTER_DIR/kubeconfig"
printf 'kubeconfig: %s\nenv: %s\n' "$CLUSTER_DIR/kubeconfig" "$ENV_FILE"
