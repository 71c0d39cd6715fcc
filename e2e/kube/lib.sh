# Shared settings for the e2e/kube scripts. Source it; do not run it.
#
# Everything built or downloaded lives under $KUBE_CACHE, outside the clone, so
# that a fresh checkout (or `cargo clean`) does not pay for the Go build again.

KUBE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
AMBIT_CACHE="${AMBIT_CACHE:-/var/cache/ambit}"

# Go settings shared by every go command below: module and build caches under
# the cache dir (reruns are incremental), no toolchain downloads, static
# binaries without paths or symbol tables.
export GOMODCACHE="$AMBIT_CACHE/kube/go/mod"
export GOCACHE="$AMBIT_CACHE/kube/go/build"
export GOTOOLCHAIN=local
export GOFLAGS="-trimpath -modcacherw -buildvcs=false"
export CGO_ENABLED=0

log() { printf '[kube] %s\n' "$*" >&2; }
die() { printf '[kube] error: %s\n' "$*" >&2; exit 1; }

# The pinned versions are read from the committed wrapper modules, so go.mod is
# the single place where a version is written. awk rather than `go list -m`
# keeps the cached path fast; `replace` lines never start with these paths.
module_version() { # <wrapper dir> <module path>
  local v
  v="$(awk -v m="$2" '$1 == m { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' \
    "$KUBE_DIR/$1/go.mod")"
  [[ -n "$v" ]] || die "bug: $2 is not required in $KUBE_DIR/$1/go.mod"
  printf '%s\n' "$v"
}

kube_version() { module_version apiserver k8s.io/kubernetes; }
etcd_version() { module_version etcd go.etcd.io/etcd/server/v3; }

# Directory that holds the binaries of one pair of versions.
bin_dir() { # <kube version> <etcd version>
  printf '%s/kube/%s-etcd-%s/bin' "$AMBIT_CACHE" "$1" "$2"
}
