#!/usr/bin/env bash
# Stop the kube-scheduler, kube-controller-manager, kube-apiserver and etcd
# that start.sh started in DIR:
#   e2e/kube/stop.sh DIR
# Kills exactly the pids recorded in DIR/env, and only while their command line
# still names DIR (a recycled pid belongs to someone else). Keeps DIR's data.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $# -eq 1 ]] || die "usage: $0 DIR"
[[ -d "$1" ]] || die "no such directory: $1"
dir="$(cd "$1" && pwd)"
env_file="$dir/env"
[[ -f "$env_file" ]] || { log "nothing to stop: no $env_file"; exit 0; }

ours() { # PID: is it alive and started for this DIR?
  tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" | grep -qF -- "$dir/"
}

# Clients before servers, so none logs errors about the other going away.
for key in SCHEDULER_PID CONTROLLER_MANAGER_PID APISERVER_PID ETCD_PID; do
  pid="$(sed -n "s/^$key=//p" "$env_file")"
  [[ "$pid" =~ ^[0-9]+$ ]] || continue
  ours "$pid" || continue
  kill -TERM "$pid"
  for _ in $(seq 1 100); do
    ours "$pid" || break
    sleep 0.1
  done
  if ours "$pid"; then
    log "pid $pid ignored SIGTERM for 10s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  log "stopped ${key%_PID} (pid $pid)"
done
