#!/usr/bin/env bash
# Build (or find cached) kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kubelet, kube-proxy and etcd at the versions pinned
# in apiserver/go.mod and etcd/go.mod, and print the directory that holds them
# on stdout (logs go to stderr):
#   BIN="$(e2e/kube/build.sh)"
#
# Idempotent: when the stamp in that directory matches the wrapper modules the
# script exits at once. A cold build takes 10-20 minutes on 2 cores; later
# builds are incremental because GOMODCACHE and GOCACHE live under $AMBIT_CACHE.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

kube="$(kube_version)"
etcd="$(etcd_version)"
bin="$(bin_dir "$kube" "$etcd")"
# The last three run the real nodes of e2e/cluster/.
kube_commands=(kube-apiserver kube-controller-manager kubectl kube-scheduler kubelet kube-proxy)
binaries=("${kube_commands[@]}" etcd)

# The stamp names the versions and hashes the wrapper modules, so editing
# go.mod/go.sum (even at the same versions) triggers a rebuild.
expected_stamp() {
  printf 'kubernetes=%s\netcd=%s\n' "$kube" "$etcd"
  (cd "$KUBE_DIR" && cat apiserver/go.mod apiserver/go.sum etcd/go.mod etcd/go.sum etcd/main.go) \
    | sha256sum | awk '{ print "wrappers=" $1 }'
}

is_cached() {
  local b
  [[ -f "$bin/stamp" ]] || return 1
  for b in "${binaries[@]}"; do [[ -x "$bin/$b" ]] || return 1; done
  [[ "$(cat "$bin/stamp")" == "$(expected_stamp)" ]]
}

if is_cached; then
  printf '%s\n' "$bin"
  exit 0
fi

command -v go >/dev/null || die "go is not installed (need the version in apiserver/go.mod)"

# Several test processes may call this at once: one builds, the others wait.
mkdir -p "$AMBIT_CACHE/kube"
exec 9>"$AMBIT_CACHE/kube/build.lock"
flock 9
if is_cached; then
  printf '%s\n' "$bin"
  exit 0
fi

log "building kubernetes $kube and etcd $etcd with $(go env GOVERSION) into $bin"
log "(cold builds take a long time on few cores; GOCACHE=$GOCACHE makes reruns fast)"
stage="$(mktemp -d "$AMBIT_CACHE/kube/stage.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
start=$SECONDS

# Same version stamping as upstream's hack/lib/version.sh, so /version and
# `kubectl version` report the real release instead of v0.0.0-master.
minor="${kube#v1.}"
minor="${minor%%.*}"
kube_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kube_ldflags+=" -X $pkg.gitVersion=$kube -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  kube_ldflags+=" -X $pkg.gitTreeState=clean"
done
(cd "$KUBE_DIR/apiserver" && go build -mod=readonly -ldflags="$kube_ldflags" -o "$stage/" \
  "${kube_commands[@]/#/k8s.io/kubernetes/cmd/}")
log "${kube_commands[*]} built after $((SECONDS - start))s"

(cd "$KUBE_DIR/etcd" && go build -mod=readonly \
  -ldflags="-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$etcd" -o "$stage/etcd" .)
log "etcd built after $((SECONDS - start))s"

# Smoke-check each binary before publishing it.
for b in "${kube_commands[@]}"; do
  [[ $b == kubectl ]] || "$stage/$b" --version >&2
done
"$stage/kubectl" version --client >&2
"$stage/etcd" --version >&2

expected_stamp >"$stage/stamp"
mkdir -p "$(dirname "$bin")"
rm -rf "$bin"
chmod 755 "$stage"
mv "$stage" "$bin"
trap - EXIT
log "done in $((SECONDS - start))s: $(du -sh "$bin" | cut -f1) in $bin"
printf '%s\n' "$bin"
