# Shared settings and helpers for the e2e/cluster scripts. Source it; do not
# run it. See README.md for the layout these names describe.

CLUSTER_DIR_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$CLUSTER_DIR_SRC/../.." && pwd)"
KUBE_SRC="$REPO_DIR/e2e/kube"

# Fixed addresses: one cluster per machine at a time (up.sh refuses a second).
BRIDGE=ambit-br0               # host bridge joining the nodes
BRIDGE_IP=10.250.0.1           # the host on it; the API forwarder listens here
NODES=(node1 node2)            # Kubernetes node names; node N is NODES[N-1]
POD_CIDR=10.244.0.0/16         # node N's pods: 10.244.N.0/24
SERVICE_CIDR=10.96.0.0/16      # as e2e/kube/start.sh configures the API server
CLUSTER_DNS_IP=10.96.0.10      # kube-dns, with up.sh's opt-in AMBIT_CLUSTER_DNS=1

# Images imported into every node's containerd. Never :latest (it would make
# the pull policy Always, and there is no registry).
PAUSE_IMAGE=ambit.local/pause:1
BUSYBOX_IMAGE=ambit.local/busybox:1

# Sysctls outside any network namespace that the kubelet sets at start
# (vm.overcommit_memory=1, kernel.panic=10, kernel.panic_on_oops=1, and three
# more that usually hold its values already). Saved before, restored after.
KUBELET_SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

# The node's own /run, /var/lib and /var/log (bind mounts in its mount
# namespace), so the paths daemons hard-code and hostPath volumes are per node.
NODE_PRIVATE_DIRS=(/run /var/lib /var/log)
# The standard CNI dirs; in each node, bind mounts of DIR/nodes/N/cni/{bin,net.d}.
NODE_CNI_DIRS=(/opt/cni/bin /etc/cni/net.d)

# runc, iptables, conntrack, sysctl, ... live in sbin, which a CI PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] error: %s\n' "$*" >&2; exit 1; }

node_index() { echo "${1#node}"; }                  # node2 -> 2
node_ip() { echo "10.250.0.$((10 + $(node_index "$1")))"; }
node_pod_cidr() { echo "10.244.$(node_index "$1").0/24"; }
node_netns() { echo "ambit-$1"; }                   # also the host end of its veth
node_cgroup() { echo "ambit-$1"; }                  # kubelet cgroupRoot /ambit-nodeN
node_dir() { echo "$CLUSTER_DIR/nodes/$1"; }
node_mntns_pin() { echo "$CLUSTER_DIR/ns/$1.mnt"; }
containerd_sock() { echo "$(node_dir "$1")/containerd/containerd.sock"; }

# The cluster directory as an absolute path without shell characters (DIR/env
# is plain KEY=VALUE that both bash and other languages read).
set_cluster_dir() { # DIR
  mkdir -p "$1"
  CLUSTER_DIR="$(cd "$1" && pwd)"
  [[ "$CLUSTER_DIR" =~ ^[A-Za-z0-9_./+-]+$ ]] \
    || die "DIR must not contain spaces or shell characters: $CLUSTER_DIR"
  ENV_FILE="$CLUSTER_DIR/env"
}

# ---------------------------------------------------------------- prerequisites

# What the cluster needs from this machine and is missing, on one line
# (empty if nothing). Shared by up.sh (fails) and smoke.sh (fails under CI).
missing_prerequisites() {
  local c missing=()
  [[ $(id -u) -eq 0 ]] || missing+=("root")
  for c in containerd runc ctr socat iptables conntrack ip nsenter unshare mountpoint gcc \
    openssl curl jq python3 ss sysctl; do
    command -v "$c" >/dev/null || missing+=("$c")
  done
  for c in bridge host-local portmap loopback; do
    [[ -x /usr/lib/cni/$c ]] || missing+=("/usr/lib/cni/$c")
  done
  # Static (ldd fails on it): it is the whole test image.
  [[ -x /bin/busybox ]] && ! ldd /bin/busybox >/dev/null 2>&1 || missing+=("static /bin/busybox")
  [[ -f "$(gcc -print-file-name=libc.a 2>/dev/null)" ]] || missing+=("libc.a (libc6-dev, for the static pause)")
  [[ -d /sys/fs/cgroup/pids && -f /sys/fs/cgroup/cpuset/cpuset.cpus ]] \
    || missing+=("cgroup v1 hierarchies under /sys/fs/cgroup")
  echo "${missing[*]}"
}

# ---------------------------------------------------------------- DIR/env

# record KEY VALUE: append at once, so that down.sh finds every resource made
# so far even when up.sh dies halfway. Values never contain spaces.
record() {
  [[ "$2" != *[[:space:]]* ]] || die "bug: recorded value with a space: $1=$2"
  printf '%s=%s\n' "$1" "$2" >>"$ENV_FILE"
}

# env_get KEY: the last value recorded for KEY (empty if none).
env_get() {
  [[ -f "$ENV_FILE" ]] || return 0
  sed -n "s/^$1=//p" "$ENV_FILE" | tail -n 1
}

# Node keys: env_key node1 NETNS -> NODE1_NETNS.
env_key() { local n="${1^^}"; echo "${n}_$2"; }

# ---------------------------------------------------------------- processes

# ours PID: alive, and its command line names the cluster directory (so a
# recycled pid that now belongs to someone else is never signalled).
ours() {
  [[ "$1" =~ ^[0-9]+$ ]] || return 1
  tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" | grep -qF -- "$CLUSTER_DIR/"
}

# stop_pid WHAT PID: SIGTERM, then SIGKILL after 10 s; only if ours.
stop_pid() {
  local what="$1" pid="$2" i
  ours "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do
    ours "$pid" || { log "stopped $what (pid $pid)"; return 0; }
    sleep 0.1
  done
  log "$what (pid $pid) ignored SIGTERM for 10s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  sleep 0.2
}

# The pids inside a node's cgroup tree (its containers; kubelet made the
# cgroups under /ambit-nodeN, which up.sh created).
cgroup_pids() { # CGROUP_NAME
  local d="/sys/fs/cgroup/pids/$1"
  [[ -d "$d" ]] || return 0
  find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -un
}

# The pids in a mount namespace (a node's containerd shims and daemons), by
# namespace inode.
mntns_pids() { # INODE
  local p
  [[ "$1" =~ ^[0-9]+$ ]] || return 0
  for p in /proc/[0-9]*; do
    [[ "$(readlink "$p/ns/mnt" 2>/dev/null)" == "mnt:[$1]" ]] && echo "${p#/proc/}"
  done
  return 0
}

# kill_all WHAT LISTER ARG: SIGKILL whatever LISTER prints until it prints
# nothing (children may be forked meanwhile), for up to 10 s.
kill_all() {
  local what="$1" lister="$2" arg="$3" pids i
  for i in $(seq 1 50); do
    pids="$("$lister" "$arg")"
    [[ -n "$pids" ]] || return 0
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.2
  done
  log "error: $what still has processes: $("$lister" "$arg" | tr '\n' ' ')"
  return 1
}

# ---------------------------------------------------------------- sysctls

# restore_sysctls FILE: set back the KEY=VALUE lines saved by up.sh (the
# kubelets change them once, at start).
restore_sysctls() {
  local line changed=()
  while IFS= read -r line; do
    [[ "$(sysctl -n "${line%%=*}")" == "${line#*=}" ]] && continue
    changed+=("${line%%=*}")
    sysctl -qw "$line"
  done <"$1"
  log "restored machine-wide sysctls: ${changed[*]:-none changed}"
}

# ---------------------------------------------------------------- pki

# sign_cert PKI NAME SUBJECT EXTENSIONS: a P-256 key and a certificate from the
# control plane's CA (as e2e/kube/start.sh signs its own).
sign_cert() {
  local pki="$1" name="$2" subject="$3" ext="$4" ca="$CLUSTER_DIR/control/pki"
  openssl ecparam -name prime256v1 -genkey -noout -out "$pki/$name.key" 2>/dev/null
  openssl req -new -key "$pki/$name.key" -subj "$subject" -out "$pki/$name.csr"
  openssl x509 -req -in "$pki/$name.csr" -CA "$ca/ca.crt" -CAkey "$ca/ca.key" \
    -CAcreateserial -days 3650 -sha256 -out "$pki/$name.crt" \
    -extfile <(printf '%s\n' "$ext") 2>/dev/null
  rm -f "$pki/$name.csr"
}

# ---------------------------------------------------------------- waiting

# wait_until WHAT SECONDS CMD...: poll CMD every 0.2 s.
wait_until() {
  local what="$1" timeout="$2" deadline=$((SECONDS + $2))
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { log "$what: not after ${timeout}s"; return 1; }
    sleep 0.2
  done
}
