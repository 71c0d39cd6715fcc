# Shared settings for e2e/gateway-conformance/{build,run}.sh. Source it; do not run it.

GC_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
GC_REPO="$(cd "$GC_DIR/../.." && pwd)"
# AMBIT_CACHE and the Go settings of e2e/kube/lib.sh (its caches: the suite shares most of its modules, client-go
# and apimachinery, with the Kubernetes build, so a machine that built the cluster has them already).
source "$GC_REPO/e2e/kube/lib.sh"

# The images the suite's v1.6.3 mesh manifests (embedded in the test binary) name: the echo image is built here
# from Istio's echo server and client and imported under that exact name (imagePullPolicy IfNotPresent finds it).
GC_ECHO_IMAGE=registry.k8s.io/gateway-api/echo-advanced:v1.5.1

gc_log() { printf '[gateway-conformance] %s\n' "$*" >&2; }
gc_die() { printf '[gateway-conformance] error: %s\n' "$*" >&2; exit 1; }

# gc_module_version DIR MODULE: the version of MODULE required in DIR/go.mod (awk: fast, no go command).
gc_module_version() {
  local v
  v="$(awk -v m="$2" '$1 == m { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' "$GC_DIR/$1/go.mod")"
  [[ -n "$v" ]] || gc_die "bug: $2 is not required in $GC_DIR/$1/go.mod"
  printf '%s\n' "$v"
}

gc_suite_version() { gc_module_version suite sigs.k8s.io/gateway-api/conformance; }
gc_coredns_version() { gc_module_version coredns github.com/coredns/coredns; }
gc_istio_version() { gc_module_version echo istio.io/istio; }
# CoreDNS's image, as e2e/cluster/up.sh (AMBIT_CLUSTER_DNS=1) runs it.
gc_coredns_image() { echo "ambit.local/coredns:$(gc_coredns_version)"; }

# The directory of one set of versions (the Istio pseudo-version shortened to its commit).
gc_cache_dir() {
  local istio
  istio="$(gc_istio_version)"
  printf '%s/gateway-conformance/gwapi-%s-coredns-%s-istio-%s\n' "$AMBIT_CACHE" "$(gc_suite_version)" \
    "$(gc_coredns_version)" "${istio##*-}"
}
