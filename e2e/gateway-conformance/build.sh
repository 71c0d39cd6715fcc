#!/usr/bin/env bash
# Build (or find cached) what the Gateway API mesh conformance run needs, and print the directory that holds it on
# stdout (logs go to stderr):
#   DIR="$(e2e/gateway-conformance/build.sh)"
# DIR (under /var/cache/ambit/gateway-conformance/, named after the versions) holds:
#   conformance.test   the suite (sigs.k8s.io/gateway-api/conformance, version in suite/go.mod), go test -c
#   crds-standard.yaml the Gateway API CRDs (standard channel) of the same release, from its Go module
#   coredns, coredns.tar             CoreDNS (coredns/go.mod) and its image ambit.local/coredns:VERSION
#   echo-server, echo-client, echo.tar
#                      Istio's echo server and client (echo/go.mod) in an image named as the suite's mesh
#                      manifests name theirs (registry.k8s.io/gateway-api/echo-advanced:v1.5.1), with a test
#                      certificate at /cert.crt, /cert.key for its TLS port
# Idempotent: when DIR/stamp matches the modules and this script, it exits at once. Cold: about 5-10 minutes on
# 2 cores (three Go builds); GOMODCACHE and GOCACHE are e2e/kube's, under /var/cache/ambit.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

out="$(gc_cache_dir)"
artifacts=(conformance.test crds-standard.yaml coredns coredns.tar echo-server echo-client echo.tar)

expected_stamp() {
  printf 'gateway-api=%s\ncoredns=%s\nistio=%s\n' "$(gc_suite_version)" "$(gc_coredns_version)" "$(gc_istio_version)"
  (cd "$GC_DIR" && cat suite/go.mod suite/go.sum suite/*_test.go coredns/go.mod coredns/go.sum echo/go.mod \
    echo/go.sum build.sh lib.sh "$GC_REPO/scripts/oci-image.py") | sha256sum | awk '{ print "inputs=" $1 }'
}
is_cached() {
  local a
  [[ -f "$out/stamp" ]] || return 1
  for a in "${artifacts[@]}"; do [[ -s "$out/$a" ]] || return 1; done
  [[ "$(cat "$out/stamp")" == "$(expected_stamp)" ]]
}

if is_cached; then printf '%s\n' "$out"; exit 0; fi
for c in go python3 openssl; do command -v "$c" >/dev/null || gc_die "missing: $c"; done

mkdir -p "$AMBIT_CACHE/gateway-conformance"
exec 9>"$AMBIT_CACHE/gateway-conformance/build.lock"
flock 9
if is_cached; then printf '%s\n' "$out"; exit 0; fi

stage="$(mktemp -d "$AMBIT_CACHE/gateway-conformance/stage.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
start=$SECONDS
gc_log "building into $out with $(go env GOVERSION) (cold: several minutes)"

# The suite: its manifests and tests are embedded in the binary.
(cd "$GC_DIR/suite" && go test -mod=readonly -c -ldflags="-s -w" -o "$stage/conformance.test" .)
gc_log "conformance.test built after $((SECONDS - start))s"

# The CRDs of the same release (the suite refuses CRDs of another bundle version).
gwapi="$(cd "$GC_DIR/suite" && go list -mod=readonly -m -f '{{.Dir}}' sigs.k8s.io/gateway-api)"
for f in "$gwapi"/config/crd/standard/*.yaml; do printf -- '---\n'; cat "$f"; done >"$stage/crds-standard.yaml"

(cd "$GC_DIR/coredns" && go build -mod=readonly -ldflags="-s -w" -o "$stage/coredns" github.com/coredns/coredns)
gc_log "coredns built after $((SECONDS - start))s"
python3 "$GC_REPO/scripts/oci-image.py" --name "$(gc_coredns_image)" --output "$stage/coredns.tar" \
  --add "$stage/coredns:/coredns" --entrypoint /coredns

(cd "$GC_DIR/echo" && go build -mod=readonly -ldflags="-s -w" -o "$stage/echo-server" \
  istio.io/istio/pkg/test/echo/cmd/server &&
  go build -mod=readonly -ldflags="-s -w" -o "$stage/echo-client" istio.io/istio/pkg/test/echo/cmd/client)
gc_log "echo server and client built after $((SECONDS - start))s"
# A self-signed test certificate for the echo server's TLS port (8443); the mesh tests only pass it through.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 -subj /CN=echo \
  -addext subjectAltName=DNS:echo,DNS:localhost -keyout "$stage/cert.key" -out "$stage/cert.crt" 2>/dev/null
chmod 644 "$stage/cert.key"
python3 "$GC_REPO/scripts/oci-image.py" --name "$GC_ECHO_IMAGE" --output "$stage/echo.tar" \
  --add "$stage/echo-server:/usr/local/bin/server" --add "$stage/echo-client:/usr/local/bin/client" \
  --add "$stage/cert.crt:/cert.crt" --add "$stage/cert.key:/cert.key" --dir /tmp:1777 \
  --env PATH=/usr/local/bin:/usr/bin:/bin --entrypoint /usr/local/bin/server

expected_stamp >"$stage/stamp"
rm -rf "$out"
chmod 755 "$stage"
mv "$stage" "$out"
trap - EXIT
gc_log "done in $((SECONDS - start))s: $(du -sh "$out" | cut -f1) in $out"
printf '%s\n' "$out"
