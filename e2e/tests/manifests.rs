//! The install manifests (`manifests/`) against a real kube-apiserver: they apply cleanly and idempotently, the
//! CRDs accept Istio's policies and refuse malformed ones, the controller's RBAC is sufficient and no broader, the
//! DaemonSet gives each node a ztunnel with the projected token, and the CA's TokenReview authenticator admits that
//! token with the pod's node (and refuses other audiences, other accounts, and deleted pods).
//!
//! Needs the Kubernetes binaries (`e2e/kube/build.sh`); without them the tests note and return, or fail under `CI`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ambit_controller::ca::{AsyncCallerAuthenticator, TokenReviewAuthenticator};
use ambit_e2e::check::poll_for;
use ambit_e2e::kube::{skip_without_kube, KubeCluster};
use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use tonic::metadata::MetadataMap;

const CONTROLLER_SA: &str = "system:serviceaccount:ambit-system:ambit-controller";
const ZTUNNEL_SA: &str = "system:serviceaccount:ambit-system:ztunnel";
const NODE_AGENT_SA: &str = "system:serviceaccount:ambit-system:ambit-node";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e has a parent").to_path_buf()
}

fn manifests() -> String {
    repo().join("manifests").display().to_string()
}

fn start(test: &str) -> Option<KubeCluster> {
    match KubeCluster::start(test) {
        Ok(c) => Some(c),
        Err(e) if skip_without_kube(test, &e) => None,
        Err(e) => panic!("{e:#}"),
    }
}

/// Applies the manifests as an operator would (README, "Install on a cluster"): the CRDs first, and once they
/// serve everything, the GatewayClasses of core/ included (kubectl maps every object of one apply before it
/// applies any, so objects of a kind whose CRD comes in the same apply would be refused).
fn install(cluster: &KubeCluster) {
    let m = repo().join("manifests");
    for dir in ["crds", "gateway-api"] {
        cluster.kubectl(["apply", "--server-side", "-k", &m.join(dir).display().to_string()]).expect(dir);
    }
    cluster.wait_established(&["crd", "-l", "app.kubernetes.io/part-of=ambit"]).expect("CRDs established");
    cluster.kubectl(["apply", "--server-side", "-k", &manifests()]).expect("manifests apply");
}

#[test]
fn manifests_apply_cleanly_idempotently_and_the_crds_take_istio_policies() {
    let Some(cluster) = start("manifests-apply") else {
        return;
    };
    install(&cluster);

    // Everything is there, and a second look finds nothing to change (no defaulting drift).
    let kinds = cluster.kubectl(["get", "crd", "-o", "name"]).unwrap();
    for crd in [
        "authorizationpolicies.security.istio.io",
        "peerauthentications.security.istio.io",
        "virtualservices.networking.istio.io",
        "destinationrules.networking.istio.io",
        "trafficsplits.split.smi-spec.io",
        "gatewayclasses.gateway.networking.k8s.io",
        "gateways.gateway.networking.k8s.io",
        "httproutes.gateway.networking.k8s.io",
        "grpcroutes.gateway.networking.k8s.io",
        "referencegrants.gateway.networking.k8s.io",
    ] {
        assert!(kinds.contains(crd), "{crd} missing from {kinds}");
    }
    let conditions = cluster
        .kubectl(["get", "crd", "-o", "jsonpath={range .items[*]}{.status.conditions[*].type}{\"\\n\"}{end}"])
        .unwrap();
    assert!(!conditions.contains("NonStructuralSchema"), "{conditions}");
    cluster.kubectl(["diff", "--server-side", "-k", &manifests()]).expect("no drift after apply");
    let dry = cluster.kubectl(["apply", "--dry-run=server", "-k", &manifests()]).expect("client-side apply dry-run");
    assert!(dry.contains("daemonset.apps/ztunnel"), "{dry}");
    assert!(dry.contains("daemonset.apps/ambit-node"), "{dry}");
    let objects =
        cluster.kubectl(["get", "sa,deploy,ds,svc,role,rolebinding", "-n", "ambit-system", "-o", "name"]).unwrap();
    for o in [
        "serviceaccount/ambit-controller",
        "serviceaccount/ztunnel",
        "serviceaccount/ambit-node",
        "deployment.apps/ambit-controller",
        "daemonset.apps/ztunnel",
        "daemonset.apps/ambit-node",
        "service/ambit-controller",
    ] {
        assert!(objects.contains(o), "{o} missing from {objects}");
    }
    let cluster_objects = cluster
        .kubectl([
            "get",
            "clusterrole,clusterrolebinding,gatewayclass",
            "-l",
            "app.kubernetes.io/part-of=ambit",
            "-o",
            "name",
        ])
        .unwrap();
    for o in [
        "clusterrole.rbac.authorization.k8s.io/ambit-controller",
        "clusterrole.rbac.authorization.k8s.io/ambit-node",
        "clusterrolebinding.rbac.authorization.k8s.io/ambit-node",
        "gatewayclass.gateway.networking.k8s.io/ambit-waypoint",
        "gatewayclass.gateway.networking.k8s.io/istio-waypoint",
    ] {
        assert!(cluster_objects.contains(o), "{o} missing from {cluster_objects}");
    }
    // The classes are the ones the controller makes waypoints for.
    let classes = cluster.kubectl(["get", "gatewayclass", "-o", "jsonpath={.items[*].metadata.name}"]).unwrap();
    let mut want = ambit_controller::model::waypoint::WAYPOINT_CLASSES.to_vec();
    want.sort_unstable();
    assert_eq!(classes, want.join(" "));
    // ambit-system admits the privileged pods (ztunnel's capabilities, the agent's host namespaces) and
    // every other namespace keeps the cluster's level.
    let psa = cluster
        .kubectl([
            "get",
            "ns",
            "ambit-system",
            "-o",
            "jsonpath={.metadata.labels.pod-security\\.kubernetes\\.io/enforce}",
        ])
        .unwrap();
    assert_eq!(psa, "privileged");
    let ports = cluster
        .kubectl(["get", "svc", "-n", "ambit-system", "ambit-controller", "-o", "jsonpath={.spec.ports[*].port}"])
        .unwrap();
    assert_eq!(ports, "15012 15014");

    // Istio's policies, in both served versions, round-trip with every field kept.
    cluster
        .apply(
            r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/demo/sa/client"]
        notPrincipals: ["cluster.local/ns/demo/sa/evil"]
        requestPrincipals: ["issuer/subject"]
        notRequestPrincipals: ["issuer/other"]
        namespaces: [demo]
        notNamespaces: [other]
        ipBlocks: ["10.0.0.0/8"]
        notIpBlocks: ["10.9.0.0/16"]
        remoteIpBlocks: ["1.2.3.0/24"]
        notRemoteIpBlocks: ["1.2.3.4"]
    to:
    - operation: {hosts: [web], notHosts: [x], ports: ["8080"], notPorts: ["9090"], methods: [GET], notMethods: [DELETE], paths: ["/api/*"], notPaths: ["/admin"]}
    when:
    - {key: source.ip, values: ["10.1.0.2"], notValues: ["10.1.0.3"]}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: deny-waypoint, namespace: demo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {methods: [POST]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: STRICT}
  portLevelMtls: {"8080": {mode: PERMISSIVE}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules: [{matches: [{path: {type: PathPrefix, value: /v2}}], backendRefs: [{name: web-v2, port: 80, weight: 10}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: grpc, port: 9000}]
  rules: [{matches: [{method: {service: echo.Echo}}], backendRefs: [{name: grpc-v1, port: 9000}]}]
"#,
        )
        .expect("Istio and Gateway API objects apply");
    let source = cluster
        .kubectl([
            "get",
            "authorizationpolicies.v1beta1.security.istio.io",
            "-n",
            "demo",
            "allow-client",
            "-o",
            "jsonpath={.spec.rules[0].from[0].source}",
        ])
        .unwrap();
    for field in
        ["notPrincipals", "requestPrincipals", "notNamespaces", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"]
    {
        assert!(source.contains(field), "{field} pruned: {source}");
    }
    let when = cluster
        .kubectl(["get", "ap", "-n", "demo", "allow-client", "-o", "jsonpath={.spec.rules[0].when[0].notValues}"])
        .unwrap();
    assert_eq!(when, r#"["10.1.0.3"]"#);
    let port_mode = cluster
        .kubectl(["get", "pa", "-n", "demo", "strict", "-o", "jsonpath={.spec.portLevelMtls.8080.mode}"])
        .unwrap();
    assert_eq!(port_mode, "PERMISSIVE");
    let route = cluster
        .kubectl(["get", "httproute", "-n", "demo", "web", "-o", "jsonpath={.spec.rules[0].backendRefs[0].weight}"])
        .unwrap();
    assert_eq!(route, "10", "route rules are kept whole");
    // The status subresource: a status write is kept, a spec write through it is not.
    cluster
        .kubectl([
            "patch",
            "ap",
            "-n",
            "demo",
            "allow-client",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"conditions":[{"type":"Accepted","status":"True","reason":"Accepted","message":"ok"}]}}"#,
        ])
        .unwrap();
    let status = cluster
        .kubectl(["get", "ap", "-n", "demo", "allow-client", "-o", "jsonpath={.status.conditions[0].type}"])
        .unwrap();
    assert_eq!(status, "Accepted");

    // Malformed objects are refused by the schema, each with its reason.
    for (doc, want) in [
        ("kind: AuthorizationPolicy\nspec: {action: MAYBE}", "Unsupported value: \"MAYBE\""),
        ("kind: AuthorizationPolicy\nspec: {selector: {matchLabels: {a: b}}, targetRefs: [{kind: Service, name: s}]}", "only one of selector"),
        ("kind: AuthorizationPolicy\nspec: {rules: [{when: [{values: [x]}]}]}", "key: Required value"),
        ("kind: AuthorizationPolicy\nspec: {rules: [{from: [{source: {principals: x}}]}]}", "expected list"),
        ("kind: PeerAuthentication\nspec: {mtls: {mode: LOOSE}}", "Unsupported value: \"LOOSE\""),
        ("kind: PeerAuthentication\nspec: {portLevelMtls: {\"80\": {mode: STRICT}}}", "portLevelMtls requires selector"),
        ("kind: PeerAuthentication\nspec: {selector: {matchLabels: {a: b}}, portLevelMtls: {\"0\": {mode: STRICT}}}", "port must be between"),
    ] {
        let yaml = format!("apiVersion: security.istio.io/v1\nmetadata: {{name: bad, namespace: demo}}\n{doc}\n");
        let err = cluster.apply(&yaml).expect_err(&format!("accepted: {doc}"));
        assert!(format!("{err:#}").contains(want), "{doc}: {err:#} does not say {want}");
    }
    let err = cluster
        .apply("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: g, namespace: demo}\nspec: {listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n")
        .expect_err("a Gateway without a class");
    assert!(format!("{err:#}").contains("gatewayClassName"), "{err:#}");
}

/// Runs every line of an `e2e/testdata/rbac/*.txt` table through `kubectl auth can-i --as=USER`.
fn check_can_i(cluster: &KubeCluster, user: &str, table: &str) {
    let path = repo().join("e2e/testdata/rbac").join(table);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut wrong = Vec::new();
    let mut checked = 0;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (want, args) = line.split_once(' ').unwrap_or_else(|| panic!("bad line in {table}: {line}"));
        let mut cmd = vec!["auth", "can-i", "--as", user];
        cmd.extend(args.split_whitespace());
        // can-i exits 1 for "no": read the answer, not the status.
        let got = match cluster.kubectl(&cmd) {
            Ok(out) => out.trim().to_string(),
            Err(e) if format!("{e:#}").contains("exit status: 1") => "no".to_string(),
            Err(e) => panic!("{line}: {e:#}"),
        };
        checked += 1;
        if got != want {
            wrong.push(format!("{line} (got {got})"));
        }
    }
    assert!(checked > 5, "{table} holds too few checks");
    assert!(wrong.is_empty(), "{user}:\n{}", wrong.join("\n"));
}

#[test]
fn the_controller_rbac_is_sufficient_and_no_broader_and_ztunnel_has_none() {
    let Some(cluster) = start("manifests-rbac") else {
        return;
    };
    install(&cluster);
    check_can_i(&cluster, CONTROLLER_SA, "controller-can-i.txt");
    check_can_i(&cluster, ZTUNNEL_SA, "ztunnel-can-i.txt");
    check_can_i(&cluster, NODE_AGENT_SA, "node-agent-can-i.txt");
    // The root Secret is granted by a Role, so no ClusterRole reaches secrets at all.
    let cluster_role =
        cluster.kubectl(["get", "clusterrole", "ambit-controller", "-o", "jsonpath={.rules[*].resources}"]).unwrap();
    assert!(!cluster_role.contains("secrets") && !cluster_role.contains('*'), "{cluster_role}");
}

fn bearer(token: &str) -> MetadataMap {
    let mut md = MetadataMap::new();
    md.insert("authorization", format!("Bearer {token}").parse().expect("token is header-safe"));
    md
}

/// A kube-rs client acting as the controller's service account (impersonated by the admin), so the review also
/// proves the controller's RBAC suffices.
async fn controller_client(cluster: &KubeCluster) -> anyhow::Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(cluster.kubeconfig())?;
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    config.auth_info.impersonate = Some(CONTROLLER_SA.to_string());
    Ok(kube::Client::try_from(config)?)
}

fn token(cluster: &KubeCluster, sa: &str, ns: &str, pod: &str, audience: &str) -> String {
    cluster
        .kubectl([
            "create",
            "token",
            sa,
            "-n",
            ns,
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            pod,
            "--audience",
            audience,
        ])
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn the_token_review_authenticator_admits_a_ztunnel_daemonset_token_with_its_node() {
    let Some(cluster) = start("manifests-token-review") else {
        return;
    };
    install(&cluster);
    // A node as a kubelet would register it; the DaemonSet then makes its ztunnel pod, which we bind as the
    // scheduler would.
    cluster.create_node("node-1").unwrap();
    cluster.kubectl(["label", "node", "node-1", "kubernetes.io/os=linux"]).unwrap();
    let ztunnel_pod = poll_for("the DaemonSet's ztunnel pod", Duration::from_secs(30), || {
        let name = cluster.kubectl([
            "get",
            "pods",
            "-n",
            "ambit-system",
            "-l",
            "app=ztunnel",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])?;
        Ok((!name.trim().is_empty()).then(|| name.trim().to_string()))
    });
    let projected = cluster
        .kubectl([
            "get",
            "pod",
            "-n",
            "ambit-system",
            &ztunnel_pod,
            "-o",
            "jsonpath={.spec.volumes[?(@.name==\"ambit-ca-token\")].projected.sources[0].serviceAccountToken.audience}",
        ])
        .unwrap();
    assert_eq!(projected, "ambit-ca");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let pods: kube::Api<Pod> = kube::Api::namespaced(cluster.client().await.unwrap(), "ambit-system");
        let binding = serde_json::json!({
            "apiVersion": "v1", "kind": "Binding", "metadata": {"name": ztunnel_pod},
            "target": {"kind": "Node", "name": "node-1"}
        });
        let _: serde_json::Value = pods
            .create_subresource("binding", &ztunnel_pod, &Default::default(), &binding)
            .await
            .context("bind")
            .unwrap();
    });
    // An app pod on the same node, for a token of the wrong account.
    cluster
        .apply("apiVersion: v1\nkind: Pod\nmetadata: {name: app, namespace: default}\nspec:\n  nodeName: node-1\n  containers: [{name: c, image: x}]\n")
        .unwrap();

    let good = token(&cluster, "ztunnel", "ambit-system", &ztunnel_pod, "ambit-ca");
    let other_audience = token(&cluster, "ztunnel", "ambit-system", &ztunnel_pod, "istio-ca");
    let other_account = token(&cluster, "default", "default", "app", "ambit-ca");

    rt.block_on(async {
        let auth = TokenReviewAuthenticator::new(controller_client(&cluster).await.unwrap());
        let caller = auth.authenticate_async(&bearer(&good)).await.expect("ztunnel token admitted");
        assert_eq!(caller.node.as_deref(), Some("node-1"), "the node comes from the token's bound pod");

        let err = auth.authenticate_async(&bearer(&other_audience)).await.expect_err("refused");
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{}", err.message());
        assert!(err.message().contains("audience"), "{} does not say audience", err.message());
        // Another account (a waypoint's, an app's) is a workload caller: no node, so it may get only its own
        // identity from the CA and no ztunnel's view over xDS.
        let workload = auth.authenticate_async(&bearer(&other_account)).await.expect("a workload token admitted");
        assert_eq!(workload.node, None, "a workload token proves no node");
        assert_eq!(workload.service_account, Some(("default".to_owned(), "default".to_owned())));
        let err = auth.authenticate_async(&bearer("not-a-jwt")).await.expect_err("garbage refused");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);

        // Deleting the pod revokes its token (the API server notices within seconds); an uncached authenticator
        // then refuses it, while a cached admission holds until its TTL, as documented.
        cluster
            .kubectl([
                "delete",
                "pod",
                "-n",
                "ambit-system",
                &ztunnel_pod,
                "--grace-period=0",
                "--force",
                "--wait=false",
            ])
            .unwrap();
        let uncached =
            TokenReviewAuthenticator::new(controller_client(&cluster).await.unwrap()).with_cache_ttl(Duration::ZERO);
        let deadline = Instant::now() + Duration::from_secs(45);
        let err = loop {
            match uncached.authenticate_async(&bearer(&good)).await {
                Err(e) => break e,
                Ok(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(500)).await,
                Ok(_) => panic!("token still admitted 45 s after its pod was deleted"),
            }
        };
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{}", err.message());
        assert_eq!(
            auth.authenticate_async(&bearer(&good)).await.unwrap().node.as_deref(),
            Some("node-1"),
            "cached for the TTL"
        );
    });
}

#[test]
fn the_workloads_args_parse_with_the_binaries_flags_and_match_their_mounts() {
    // No cluster needed: read the manifests themselves.
    let read = |f: &str| -> Vec<serde_yaml::Value> {
        let text = std::fs::read_to_string(repo().join("manifests/core").join(f)).unwrap();
        text.split("\n---\n").map(|d| serde_yaml::from_str(d).unwrap()).collect()
    };
    let container = |docs: &[serde_yaml::Value], kind: &str| -> serde_yaml::Value {
        let doc = docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"));
        doc["spec"]["template"]["spec"]["containers"][0].clone()
    };
    let args = |c: &serde_yaml::Value| -> Vec<String> {
        c["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect()
    };
    let flag = |args: &[String], name: &str| -> String {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("no --{name}"))
            .to_string()
    };

    let ds = read("ztunnel.yaml");
    let zt = container(&ds, "DaemonSet");
    let zt_args = args(&zt);
    let mut argv = vec!["ztunnel".to_string(), "--node-name=node-1".to_string()];
    argv.extend(zt_args.iter().cloned());
    let parsed = <ztunnel::config::Args as clap::Parser>::try_parse_from(&argv).expect("ztunnel flags parse");
    let config = ztunnel::config::Config::from_args(parsed).expect("ztunnel config builds");
    config.validate().expect("ztunnel config validates");
    // ztunnel finishes draining, and exits 0, before the kubelet's SIGKILL.
    let grace = ds.iter().find(|d| d["kind"] == "DaemonSet").unwrap()["spec"]["template"]["spec"]
        ["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(config.drain_timeout < std::time::Duration::from_secs(grace), "--drain-timeout within the grace period");
    let node_env = zt["env"].as_sequence().unwrap().iter().find(|e| e["name"] == "NODE_NAME").unwrap().clone();
    assert_eq!(node_env["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    // The token and root files live where the volumes are mounted.
    let mounts = zt["volumeMounts"].as_sequence().unwrap();
    let mounted = |path: &str| -> String {
        let m = mounts
            .iter()
            .find(|m| path.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())))
            .unwrap_or_else(|| panic!("{path} is not under a mount"));
        m["name"].as_str().unwrap().to_string()
    };
    assert_eq!(mounted(&flag(&zt_args, "token-file")), "ambit-ca-token");
    assert_eq!(mounted(&flag(&zt_args, "mesh-root")), "ambit-ca-root-cert");
    assert_eq!(mounted(&flag(&zt_args, "zds-socket")), "ztunnel-socket-dir");
    let volumes = ds[0]["spec"]["template"]["spec"]["volumes"].as_sequence().unwrap();
    let token_volume = volumes.iter().find(|v| v["name"] == "ambit-ca-token").unwrap();
    let sa_token = &token_volume["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(sa_token["audience"], ambit_controller::ca::token_review::DEFAULT_AUDIENCE);
    assert!(flag(&zt_args, "token-file").ends_with(&format!("/{}", sa_token["path"].as_str().unwrap())));
    let root_volume = volumes.iter().find(|v| v["name"] == "ambit-ca-root-cert").unwrap();
    assert_eq!(root_volume["configMap"]["name"], "ambit-ca-root-cert");
    assert_eq!(zt["readinessProbe"]["httpGet"]["port"], 15021);
    assert_eq!(flag(&zt_args, "xds-address"), "https://ambit-controller.ambit-system.svc:15012");

    let controller_docs = read("controller.yaml");
    let ctl = container(&controller_docs, "Deployment");
    let mut argv = vec!["ambit-controller".to_string()];
    argv.extend(args(&ctl));
    // AMBIT_* environment values set flags through the names clap reads them from: each must be a flag's `env`.
    let command = <ambit_controller::config::Args as clap::CommandFactory>::command();
    for e in ctl["env"].as_sequence().unwrap() {
        let name = e["name"].as_str().unwrap();
        let Some(value) = e["value"].as_str().filter(|_| name.starts_with("AMBIT_")) else { continue };
        let long = command
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|v| v == name))
            .and_then(|a| a.get_long())
            .unwrap_or_else(|| panic!("the controller has no flag read from {name}"));
        argv.push(format!("--{long}={value}"));
    }
    let parsed =
        <ambit_controller::config::Args as clap::Parser>::try_parse_from(&argv).expect("controller flags parse");
    let config = ambit_controller::config::Config::from_args(parsed);
    config.validate().expect("controller config validates");
    assert!(
        matches!(config.mode(), Ok(ambit_controller::config::Mode::Kubernetes(_))),
        "the Deployment runs the controller in Kubernetes mode"
    );
    assert_eq!(config.kube.token_audience, ambit_controller::ca::token_review::DEFAULT_AUDIENCE);
    assert!(ctl.get("volumeMounts").is_none(), "the controller needs no writable directory");
    assert!(
        config.serving_dns_names.iter().any(|n| n == &config_server_name(&zt_args)),
        "the serving certificate names what ztunnel checks"
    );
    assert_eq!(config.listen.port(), 15012);
    assert_eq!(config.metrics_addr.port(), 15014);
    assert_eq!(config.kube.waypoint_image_pull_policy.as_deref(), Some("IfNotPresent"));
    assert!(config.serving_dns_names.iter().any(|n| config.kube.waypoint_xds_address == format!("{n}:15012")));

    // The node agent: its own DaemonSet, host namespaces, its paths on the node's standard directories and on
    // ztunnel's socket directory. (Its flags are not parsed here: the binary is not in this workspace yet.)
    let agent_docs = read("node-agent.yaml");
    let agent_ds = agent_docs.iter().find(|d| d["kind"] == "DaemonSet").expect("the agent's DaemonSet");
    assert_eq!(agent_ds["metadata"]["name"], "ambit-node");
    let pod = &agent_ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "ambit-node");
    assert_eq!(pod["hostNetwork"], true, "CNI never runs for the agent's own pod");
    assert_eq!(pod["hostPID"], true, "pods are found by their processes' network namespaces");
    assert_eq!(pod["terminationGracePeriodSeconds"], 30);
    assert_eq!(agent_ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"], 0, "never two agents on a node");
    let agent = container(&agent_docs, "DaemonSet");
    assert_eq!(agent["securityContext"]["privileged"], true);
    let agent_args = args(&agent);
    assert_eq!(flag(&agent_args, "node-name"), "$(NODE_NAME)");
    let agent_env = |name: &str| agent["env"].as_sequence().unwrap().iter().find(|e| e["name"] == name).cloned();
    assert_eq!(agent_env("NODE_NAME").unwrap()["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    // A stopping agent removes the plugin only when its own DaemonSet is going away.
    assert_eq!(agent_env("POD_NAMESPACE").unwrap()["valueFrom"]["fieldRef"]["fieldPath"], "metadata.namespace");
    assert_eq!(agent_env("AMBIT_OWNER_DAEMONSET").unwrap()["value"], "$(POD_NAMESPACE)/ambit-node");
    let ready_port: i64 = flag(&agent_args, "readiness-addr").rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(agent["readinessProbe"]["httpGet"]["port"], ready_port);
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/healthz/ready");
    // Each path flag lies on a hostPath volume of the right host directory.
    let agent_mounts = agent["volumeMounts"].as_sequence().unwrap();
    let agent_volumes = pod["volumes"].as_sequence().unwrap();
    let host_path_of = |path: &str| -> (String, serde_yaml::Value) {
        let m = agent_mounts
            .iter()
            .filter(|m| {
                let at = m["mountPath"].as_str().unwrap();
                path == at || path.starts_with(&format!("{at}/"))
            })
            .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
            .unwrap_or_else(|| panic!("{path} is not under a mount"));
        let v = agent_volumes.iter().find(|v| v["name"] == m["name"]).unwrap();
        let rest = path.strip_prefix(m["mountPath"].as_str().unwrap()).unwrap();
        (format!("{}{rest}", v["hostPath"]["path"].as_str().unwrap()), m.clone())
    };
    assert_eq!(host_path_of(&flag(&agent_args, "cni-bin-dir")).0, "/opt/cni/bin");
    assert_eq!(host_path_of(&flag(&agent_args, "cni-conf-dir")).0, "/etc/cni/net.d");
    assert_eq!(host_path_of(&flag(&agent_args, "cni-socket")).0, "/var/run/ambit/cni.sock");
    let zt_socket_volume = volumes.iter().find(|v| v["name"] == "ztunnel-socket-dir").unwrap();
    assert_eq!(
        host_path_of(&flag(&agent_args, "zds-socket")).0,
        format!("{}/ztunnel.sock", zt_socket_volume["hostPath"]["path"].as_str().unwrap()),
        "the agent serves ZDS where ztunnel connects"
    );
    assert_eq!(flag(&agent_args, "zds-socket"), flag(&zt_args, "zds-socket"));
    let (netns, netns_mount) = host_path_of("/var/run/netns");
    assert_eq!(netns, "/var/run/netns");
    assert_eq!(netns_mount["mountPropagation"], "HostToContainer");
}

fn config_server_name(zt_args: &[String]) -> String {
    zt_args
        .iter()
        .find_map(|a| a.strip_prefix("--controller-server-name="))
        .unwrap_or("ambit-controller.ambit-system.svc")
        .to_string()
}
