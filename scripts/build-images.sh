#!/usr/bin/env bash
# Build Ambit's container images without a Docker engine or a registry:
#   scripts/build-images.sh [OUT_DIR]        (default: target/images)
# builds the release binaries (cargo build --release --bins) and writes one OCI image-layout tar per image with
# scripts/oci-image.py, each binary with the shared libraries ldd lists:
#   OUT_DIR/controller.tar   ambit.local/controller:TAG   ambit-controller
#   OUT_DIR/ztunnel.tar      ambit.local/ztunnel:TAG      ztunnel
#   OUT_DIR/waypoint.tar     ambit.local/waypoint:TAG     ambit-waypoint
#   OUT_DIR/node-agent.tar   ambit.local/node-agent:TAG   ambit-node-agent, ambit-cni, and what capture runs in
#                                                         pod namespaces: nsenter, nft, ip
# Import a tar with `ctr -n k8s.io images import FILE` (e2e/cluster/mesh.sh) or `kind load image-archive FILE`
# (e2e/kind/run.sh). The Dockerfiles beside each component (controller/, ztunnel/, waypoint/, cni-plugin/) build the same
# images with a Docker engine.
#
# Environment:
#   AMBIT_IMAGE_TAG=dev           the tag (never latest: the pull policy would become Always)
#   AMBIT_IMAGES_ALLOW_MISSING=1  an image whose binary the workspace does not declare (yet) is skipped with a
#                                 message; without it that is an error
#   AMBIT_NO_CARGO_BUILD=1        use the binaries already in target/release (they must be there)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo/target/images}"
tag="${AMBIT_IMAGE_TAG:-dev}"
allow_missing="${AMBIT_IMAGES_ALLOW_MISSING:-0}"
release="$repo/target/release"
[[ "$tag" != latest ]] || { echo "build-images: AMBIT_IMAGE_TAG must not be latest" >&2; exit 1; }
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

log() { printf '[build-images] %s\n' "$*" >&2; }
die() { printf '[build-images] error: %s\n' "$*" >&2; exit 1; }

for c in cargo python3 ldd jq; do command -v "$c" >/dev/null || die "missing: $c"; done

# The binaries the workspace declares ([[bin]] targets and src/main.rs of every member).
declared="$(cd "$repo" && cargo metadata --no-deps --format-version 1 \
  | jq -r '.packages[].targets[] | select(.kind | index("bin")) | .name')"
is_declared() { grep -qx -- "$1" <<<"$declared"; }

if [[ "${AMBIT_NO_CARGO_BUILD:-0}" != 1 ]]; then
  log "cargo build --release --bins"
  (cd "$repo" && cargo build --release --bins)
fi
mkdir -p "$out"

# image NAME BINARY... -- OCI-IMAGE-ARGS...: the image, unless one of its binaries is not declared (then skipped
# with AMBIT_IMAGES_ALLOW_MISSING=1, else an error).
built=() skipped=()
image() {
  local name="$1" bins=() b adds=()
  shift
  while [[ "$1" != -- ]]; do bins+=("$1"); shift; done
  shift
  for b in "${bins[@]}"; do
    if ! is_declared "$b"; then
      local why="binary $b is not in this workspace yet, so image ambit.local/$name:$tag is not built"
      [[ "$allow_missing" == 1 ]] || die "$why (AMBIT_IMAGES_ALLOW_MISSING=1 skips it)"
      log "SKIPPED: $why (AMBIT_IMAGES_ALLOW_MISSING=1)"
      rm -f "$out/$name.tar"   # not an earlier build's
      skipped+=("$name")
      return 0
    fi
    [[ -x "$release/$b" ]] || die "$release/$b missing after the build"
    adds+=(--add "$release/$b:/usr/local/bin/$b")
  done
  python3 "$repo/scripts/oci-image.py" --name "ambit.local/$name:$tag" --output "$out/$name.tar" \
    "${adds[@]}" "$@" --with-libs --env PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  built+=("$out/$name.tar")
}

# The controller runs as 1337 in its Deployment; the image's own user is distroless' "nonroot", as in
# controller/Dockerfile.
image controller ambit-controller -- \
  --entrypoint /usr/local/bin/ambit-controller --user 65532:65532

image ztunnel ztunnel -- \
  --entrypoint /usr/local/bin/ztunnel --user 65532:65532

# The waypoint needs no privilege: an ordinary pod, not captured, listening on unprivileged ports.
image waypoint ambit-waypoint -- \
  --entrypoint /usr/local/bin/ambit-waypoint --user 65532:65532

# Capture runs `nsenter --net=NETNS nft|ip ...` (cni-plugin/src/capture/exec.rs): those three with their
# libraries, and the name databases nft may look protocol and service names up in.
agent_tools=()
for t in nsenter:/usr/bin/nsenter nft:/usr/sbin/nft ip:/usr/sbin/ip; do
  p="$(command -v "${t%%:*}")" || die "missing on this machine: ${t%%:*} (apt-get install util-linux nftables iproute2)"
  agent_tools+=(--add "$p:${t#*:}")
done
for f in /etc/protocols /etc/services; do [[ -f "$f" ]] && agent_tools+=(--add "$f:$f"); done
image node-agent ambit-node-agent ambit-cni -- \
  "${agent_tools[@]}" --dir /tmp:1777 --entrypoint /usr/local/bin/ambit-node-agent

log "built: ${built[*]:-none}"
((${#skipped[@]} == 0)) || log "skipped (binary not in the workspace): ${skipped[*]}"
