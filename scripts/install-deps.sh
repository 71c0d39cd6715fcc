#!/usr/bin/env bash
# Installs what building and running Ambit on this machine needs: Debian
# packages with apt-get (run as root), crates come with cargo. Idempotent.
set -euo pipefail

PACKAGES=(nftables iproute2 util-linux procps ca-certificates python3 openssl curl)
# The two-node Kubernetes cluster of e2e/cluster/: a containerd and runc per
# node, the reference CNI plugins (/usr/lib/cni), socat to forward the API
# server to the nodes, iptables/conntrack for kube-proxy, gcc + libc6-dev for
# the static pause binary and busybox-static for the test image.
PACKAGES+=(containerd runc containernetworking-plugins socat iptables conntrack
    gcc libc6-dev busybox-static jq)
# The L7 benchmark (bench-l7): wrk generates the load, nginx serves it,
# HAProxy is the reference L7 proxy. bench-l4 checks its throughput with iperf3.
PACKAGES+=(wrk nginx-light haproxy iperf3)
# eBPF capture (ebpf/): clang compiles the programs, libbpf-dev has their
# helper headers, bpftool lets the tests check what is attached.
PACKAGES+=(clang libbpf-dev bpftool)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "install-deps: need root to install: ${missing[*]}" >&2
        exit 1
    fi
    echo "install-deps: installing ${missing[*]}"
    # nginx, haproxy and iperf3 are only run by the benchmarks, in lab namespaces: their packages must not start
    # machine-wide daemons (policy-rc.d refuses every service start while it exists).
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
    fi
    apt-get update -qq
    status=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || status=$?
    ((own_policy)) && rm -f "$policy"
    ((status == 0)) || exit "$status"
fi

if ! command -v cargo >/dev/null; then
    for d in "$HOME/.cargo/bin" /usr/local/cargo/bin; do
        [[ -x $d/cargo ]] && export PATH="$d:$PATH"
    done
fi
if ! command -v cargo >/dev/null; then
    echo "install-deps: a Rust toolchain (cargo, rustc >= 1.89) is required; install it with rustup" >&2
    exit 1
fi
