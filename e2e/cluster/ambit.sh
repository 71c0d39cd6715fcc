# Checks of Ambit installed on a cluster, shared by e2e/cluster/mesh.sh and e2e/gateway-conformance/run.sh. Source
# it; do not run it. The caller defines `k` (kubectl for the cluster) and `on_node NODE CMD...` before calling them.

# Whether the controller Deployment is Available.
controller_available() {
  [[ "$(k get deploy -n ambit-system ambit-controller -o jsonpath='{.status.conditions[?(@.type=="Available")].status}')" == True ]]
}

# ztunnel pod of NODE (name), and whether it took its state from the controller over xDS (its TLS, the projected
# token's TokenReview and the root ConfigMap all work then).
ztunnel_pod() { # NODE
  k get pods -n ambit-system -l app=ztunnel --field-selector "spec.nodeName=$1,status.phase=Running" \
    -o jsonpath='{.items[0].metadata.name}' 2>/dev/null
}
ztunnel_synced() { local p; p="$(ztunnel_pod "$1")" && [[ -n "$p" ]] && k logs -n ambit-system "$p" | grep -q 'xds: synced'; }

# Rolled out: every scheduled pod updated and ready, on both nodes. ztunnel is ready only once the node agent has
# connected to it over ZDS.
rolled_out() { # DAEMONSET
  local s
  s="$(k get ds -n ambit-system "$1" -o jsonpath='{.status.desiredNumberScheduled}/{.status.updatedNumberScheduled}/{.status.numberReady}')"
  [[ "$s" == 2/2/2 ]]
}

# The node's CNI conflists, file names and content; whether the agent installed ambit-cni there.
conflists() { # NODE
  on_node "$1" sh -c 'for f in /etc/cni/net.d/*; do echo "== $f"; cat "$f"; done'
}
plugin_installed() { [[ "$(conflists "$1")" == *ambit-cni* ]] && on_node "$1" test -x /opt/cni/bin/ambit-cni; }

# Whether the waypoint Deployment the controller made for the Gateway `waypoint` of NAMESPACE is Available.
waypoint_available() { # NAMESPACE
  [[ "$(k get deploy -n "$1" waypoint -o jsonpath='{.status.conditions[?(@.type=="Available")].status}' 2>/dev/null)" == True ]]
}

# This project's cluster has no node IPAM: give each Node the range its conflist hands out, as a cloud's or
# kubeadm's Node has it (the agent reads spec.podCIDRs for the kubelet-probe SNAT). Settable once; kept if set.
set_pod_cidrs() {
  local n
  for n in "${NODES[@]}"; do
    [[ -n "$(k get node "$n" -o jsonpath='{.spec.podCIDR}')" ]] ||
      k patch node "$n" --type merge \
        -p "{\"spec\":{\"podCIDR\":\"$(node_pod_cidr "$n")\",\"podCIDRs\":[\"$(node_pod_cidr "$n")\"]}}" >/dev/null
  done
}
