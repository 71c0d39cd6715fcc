#!/usr/bin/env bash
# Tear down the cluster that up.sh started in DIR:
#   e2e/cluster/down.sh DIR
# Removes exactly what DIR/env records, which up.sh appends as it goes, so
# this is also right after a partial up. Processes are signalled by pid only:
# the recorded daemons while their command line still names DIR, and the
# containers and shims found in the nodes' own cgroups and mount namespaces.
# Every step runs even if an earlier one failed; the exit status says whether
# all succeeded. Keeps DIR's logs and configuration, removes its state
# (etcd, containerd, kubelet directories), and renames DIR/env to env.down.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $# -eq 1 ]] || die "usage: $0 DIR"
[[ -d "$1" ]] || die "no such directory: $1"
set_cluster_dir "$1"
[[ -f "$ENV_FILE" ]] || { log "nothing to tear down: no $ENV_FILE"; exit 0; }
[[ $(id -u) -eq 0 ]] || die "needs root"

failures=0
step() { # CMD...: run, count a failure, carry on
  "$@" || { log "error: failed: $*"; failures=$((failures + 1)); }
}

exists_link() { ip link show "$1" >/dev/null 2>&1; }

# ---------------------------------------------------------------- nodes

kill_node_processes() { # NODE
  local n="$1" cg ino pin ok=0
  # The kubelet first, so it does not restart the containers killed next.
  stop_pid "$n kubelet" "$(env_get "$(env_key "$n" KUBELET_PID)")"
  stop_pid "$n kube-proxy" "$(env_get "$(env_key "$n" KUBE_PROXY_PID)")"
  cg="$(env_get "$(env_key "$n" CGROUP)")"
  [[ -z "$cg" ]] || kill_all "$n containers" cgroup_pids "$cg" || ok=1
  stop_pid "$n containerd" "$(env_get "$(env_key "$n" CONTAINERD_PID)")"
  # containerd-shim-runc-v2 processes outlive containerd; they live in the
  # node's mount namespace, as does anything else started in the node (a
  # daemon whose pid up.sh had no time to record, too).
  ino="$(env_get "$(env_key "$n" MNTNS_INO)")"
  pin="$(env_get "$(env_key "$n" MNTNS)")"
  if [[ -z "$ino" && -n "$pin" ]] && mountpoint -q "$pin"; then ino="$(stat -L -c %i "$pin")"; fi
  [[ -z "$ino" ]] || kill_all "$n shims" mntns_pids "$ino" || ok=1
  return $ok
}

# With no process left in it, unmounting the pin frees the node's mount
# namespace and with it every mount made inside: kubelet volumes, container
# root filesystems, the pods' network namespace pins.
release_mount_namespace() { # NODE
  local pin
  pin="$(env_get "$(env_key "$1" MNTNS)")"
  [[ -n "$pin" ]] || return 0
  if mountpoint -q "$pin"; then umount "$pin" || return 1; fi
  rm -f "$pin"
}

remove_node_network() { # NODE
  local n="$1" ns veth route ok=0
  ns="$(env_get "$(env_key "$n" NETNS)")"
  veth="$(env_get "$(env_key "$n" VETH)")"
  route="$(env_get "$(env_key "$n" HOST_ROUTE)")"
  if [[ -n "$route" ]] && ip route show "$route" | grep -q .; then
    ip route del "$route" || ok=1
  fi
  # Deleting the host end deletes the pair at once (deleting the namespace
  # would too, but asynchronously).
  if [[ -n "$veth" ]] && exists_link "$veth"; then ip link del "$veth" || ok=1; fi
  if [[ -n "$ns" && -e "/run/netns/$ns" ]]; then ip netns del "$ns" || ok=1; fi
  return $ok
}

# The node's cgroups in every hierarchy (the kubelet and runc made children
# under the ones up.sh made; cgroup v2's too in hybrid mode), leaves first.
remove_cgroups() { # NODE
  local cg d ok=0
  cg="$(env_get "$(env_key "$1" CGROUP)")"
  [[ -n "$cg" ]] || return 0
  [[ "$cg" =~ ^ambit-node[0-9]+$ ]] || { log "error: not our cgroup name: $cg"; return 1; }
  for d in /sys/fs/cgroup/*/"$cg"; do
    [[ -d "$d" ]] || continue
    find "$d" -depth -type d -exec rmdir {} + || ok=1
  done
  return $ok
}

down_node() { # NODE
  local n="$1"
  step kill_node_processes "$n"
  step release_mount_namespace "$n"
  step remove_node_network "$n"
  step remove_cgroups "$n"
}

# ---------------------------------------------------------------- host

remove_bridge() {
  local br
  br="$(env_get BRIDGE)"
  [[ -n "$br" ]] && exists_link "$br" || return 0
  ip link del "$br"
}

unmount_ns_dir() {
  local d
  d="$(env_get NS_BIND)"
  [[ -n "$d" ]] && mountpoint -q "$d" || return 0
  umount "$d"
}

# socat forks a child per connection, and a child whose node vanished before
# its FIN arrived would keep its API server connection open (and delay the
# API server's shutdown by its full grace period): the children go first.
stop_forwarder() {
  local pid child
  pid="$(env_get FORWARDER_PID)"
  ours "$pid" || return 0
  for child in $(ps -o pid= --ppid "$pid"); do stop_pid "API forwarder connection" "$child"; done
  stop_pid "API forwarder" "$pid"
}

stop_control_plane() {
  local control
  control="$(env_get CONTROL_DIR)"
  [[ -n "$control" && -f "$control/env" ]] || return 0
  "$KUBE_SRC/stop.sh" "$control"
}

# Nothing may stay mounted under DIR before its state is deleted (rm -rf
# would descend into whatever is mounted there).
mounts_under_dir() {
  awk -v d="$CLUSTER_DIR/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo
}

# The CNI mount points up.sh created on the host (empty: the nodes' bind
# mounts over them are gone with their mount namespaces); rmdir only, so
# nothing anyone put there is deleted.
remove_host_dirs() {
  local d ok=0
  IFS=, read -ra dirs <<<"$(env_get CREATED_HOST_DIRS)"
  for d in "${dirs[@]}"; do
    [[ "$d" == /etc/cni* || "$d" == /opt/cni* ]] || { log "error: not a CNI dir: $d"; ok=1; continue; }
    [[ -d "$d" ]] || continue
    find "$d" -depth -type d -exec rmdir {} + || ok=1
  done
  return $ok
}

remove_state() {
  local left n
  left="$(mounts_under_dir)"
  if [[ -n "$left" ]]; then
    log "error: still mounted under $CLUSTER_DIR, state kept: $left"
    return 1
  fi
  rm -rf "$CLUSTER_DIR/ns" "$CLUSTER_DIR/control/etcd"
  IFS=, read -ra nodes <<<"$(env_get NODES)"
  for n in "${nodes[@]}"; do
    rm -rf "$(node_dir "$n")"/{containerd,kubelet,fs,cni/ipam}
  done
}

# ---------------------------------------------------------------- main

t0=$SECONDS
IFS=, read -ra nodes <<<"$(env_get NODES)"
for ((i = ${#nodes[@]} - 1; i >= 0; i--)); do down_node "${nodes[i]}"; done
step stop_forwarder
step stop_control_plane
step remove_bridge
step unmount_ns_dir
saved="$(env_get SYSCTLS_SAVED)"
[[ -z "$saved" || ! -f "$saved" ]] || step restore_sysctls "$saved"
step remove_host_dirs
step remove_state
if ((failures)); then
  log "down finished with $failures failed step(s); $ENV_FILE kept for another try"
  exit 1
fi
mv "$ENV_FILE" "$ENV_FILE.down"
log "cluster in $CLUSTER_DIR torn down in $((SECONDS - t0))s"
