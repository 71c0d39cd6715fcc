//! The waypoint deployment controller against a real kube-apiserver and
//! kube-controller-manager: a waypoint Gateway gets a ServiceAccount, a
//! Deployment and a Service it owns, and status that follows them; other
//! Gateways get nothing; deleting the Gateway garbage-collects the rest.
//!
//! There is no kubelet: the test marks the ReplicaSet's pod Ready itself, and
//! the Deployment's `availableReplicas` then comes from the real Deployment
//! and ReplicaSet controllers (a hand-written Deployment status would be
//! overwritten by the Deployment controller on its next sync).

use std::future::Future;
use std::time::{Duration, Instant};

use ambit_controller::waypoints::{self, WaypointSettings};
use ambit_e2e::kube::{skip_without_kube, KubeCluster};
use anyhow::{bail, Context};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use kube::api::{Api, DynamicObject, ListParams};

const NS: &str = "shop";
const IMAGE: &str = "example.test/ambit/waypoint:e2e";
const TIMEOUT: Duration = Duration::from_secs(60);
/// The garbage collector notices a CRD installed after it started only at its next
/// discovery resync (every 30 s), so deletion may take that long.
const GC_TIMEOUT: Duration = Duration::from_secs(120);

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n";

fn gateway(name: &str, class: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: {name}\n  namespace: {NS}\n\
         spec:\n  gatewayClassName: {class}\n  listeners:\n  - name: mesh\n    port: 15008\n    protocol: HBONE\n"
    )
}

/// Polls `f` every 100 ms until it yields a value; fails after `TIMEOUT` with the last error.
async fn eventually<T, F, Fut>(what: &str, f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    eventually_within(TIMEOUT, what, f).await
}

async fn eventually_within<T, F, Fut>(within: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + within;
    let mut last = None;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = Some(e),
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what} (last error: {last:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prints how long a step took and restarts the clock.
fn step(clock: &mut Instant, what: &str) {
    eprintln!("waypoint_deploy: {what}: {:?}", clock.elapsed());
    *clock = Instant::now();
}

fn condition<'a>(gw: &'a DynamicObject, type_: &str) -> Option<(&'a str, &'a str)> {
    let c = gw.data["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)?;
    Some((c["status"].as_str()?, c["reason"].as_str()?))
}

#[test]
fn waypoint_gateways_get_an_owned_deployment_service_and_status() {
    let name = "waypoint_gateways_get_an_owned_deployment_service_and_status";
    let mut clock = Instant::now();
    let cluster = match KubeCluster::start("waypoint-deploy") {
        Ok(c) => c,
        Err(e) if skip_without_kube(name, &e) => return,
        Err(e) => panic!("{e:#}"),
    };
    step(&mut clock, "start the api server");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(scenario(&cluster, clock)).unwrap();
}

async fn scenario(cluster: &KubeCluster, mut clock: Instant) -> anyhow::Result<()> {
    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/gateway-api/crds.yaml");
    cluster.kubectl(["apply", "--server-side", "-f", crds])?;
    cluster.wait_established(&["crd/gateways.gateway.networking.k8s.io"])?;
    cluster.apply(NAMESPACE)?;
    step(&mut clock, "install the Gateway API CRDs");

    let client = cluster.client().await?;
    let settings = WaypointSettings {
        image: IMAGE.into(),
        cpu_request: Some("200m".into()),
        memory_request: Some("64Mi".into()),
        ..WaypointSettings::default()
    };
    let root = "-----BEGIN CERTIFICATE-----\nlab root (public)\n-----END CERTIFICATE-----\n";
    let controller = tokio::spawn(waypoints::run(client.clone(), settings, root.to_owned()));

    // A Gateway of another class first: by the time the waypoint is done, it has had its chance.
    cluster.apply(&gateway("ingress", "some-other-class"))?;
    cluster.apply(&gateway("wp", "ambit-waypoint"))?;
    let gateways: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &waypoints::gateway_resource());
    let gw = gateways.get("wp").await?;
    let uid = gw.metadata.uid.clone().context("gateway uid")?;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), NS);
    let dep = eventually("the waypoint deployment", || async { Ok(deployments.get_opt("wp").await?) }).await?;
    let svc = eventually("the waypoint service", || async { Ok(services.get_opt("wp").await?) }).await?;
    let sa = eventually("the waypoint service account", || async { Ok(accounts.get_opt("wp").await?) }).await?;
    step(&mut clock, "deployment, service and service account created");

    // The mesh root in the waypoint's namespace, mounted where the waypoint reads it.
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let map = eventually("the mesh root configmap", || async { Ok(maps.get_opt("ambit-ca-root-cert").await?) }).await?;
    assert_eq!(map.data.as_ref().and_then(|d| d.get("root-cert.pem")).map(String::as_str), Some(root));

    for (kind, owners) in [
        ("Deployment", &dep.metadata.owner_references),
        ("Service", &svc.metadata.owner_references),
        ("ServiceAccount", &sa.metadata.owner_references),
    ] {
        let owners = owners.as_deref().unwrap_or_default();
        assert!(
            owners.iter().any(|o| o.kind == "Gateway" && o.name == "wp" && o.uid == uid && o.controller == Some(true)),
            "{kind} must be owned by the Gateway: {owners:?}"
        );
    }
    let pod = dep.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("wp"));
    let container = &pod.containers[0];
    assert_eq!(container.image.as_deref(), Some(IMAGE));
    let mut ports: Vec<i32> = container.ports.iter().flatten().map(|p| p.container_port).collect();
    ports.sort_unstable();
    assert_eq!(ports, [15008, 15020, 15021]);
    let requests = container.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert_eq!(requests["cpu"].0, "200m");
    assert_eq!(requests["memory"].0, "64Mi");
    let labels = dep.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
    assert_eq!(labels["gateway.networking.k8s.io/gateway-name"], "wp");
    let svc_spec = svc.spec.as_ref().unwrap();
    assert!(svc_spec.ports.iter().flatten().any(|p| p.port == 15008), "{:?}", svc_spec.ports);
    let cluster_ip = svc_spec.cluster_ip.clone().context("service has no clusterIP")?;
    assert!(cluster_ip.starts_with("10.96."), "{cluster_ip}");

    // Accepted, not yet Programmed, with the Service's address.
    let gw = eventually("Accepted and Pending status", || async {
        let gw = gateways.get("wp").await?;
        let ok = condition(&gw, "Accepted") == Some(("True", "Accepted"))
            && condition(&gw, "Programmed") == Some(("False", "Pending"));
        Ok(ok.then_some(gw))
    })
    .await?;
    let addresses = &gw.data["status"]["addresses"];
    assert_eq!(addresses[0]["type"], "IPAddress", "{addresses}");
    assert_eq!(addresses[0]["value"], cluster_ip.as_str(), "{addresses}");
    assert_eq!(addresses.as_array().map(Vec::len), Some(1), "{addresses}");
    step(&mut clock, "status Accepted=True, Programmed=False, address = ClusterIP");

    // Play the kubelet: the ReplicaSet's pod becomes Ready, the real controllers make the
    // Deployment available, and that Deployment change reconciles the Gateway.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let selector = ListParams::default().labels("gateway.networking.k8s.io/gateway-name=wp");
    let pod_name = eventually("the waypoint pod", || async {
        Ok(pods.list(&selector).await?.items.into_iter().find_map(|p| p.metadata.name))
    })
    .await?;
    cluster.set_pod_running(NS, &pod_name, "10.1.0.9")?;
    eventually("deployment availableReplicas 1", || async {
        let d = deployments.get("wp").await?;
        let available = d.status.and_then(|s| s.available_replicas).unwrap_or(0);
        Ok((available >= 1).then_some(()))
    })
    .await?;
    step(&mut clock, "deployment available (pod marked Ready)");
    let gw = eventually("Programmed=True", || async {
        let gw = gateways.get("wp").await?;
        Ok((condition(&gw, "Programmed") == Some(("True", "Programmed"))).then_some(gw))
    })
    .await?;
    step(&mut clock, "status Programmed=True");

    // Idempotent: tamper with a label we own; the reconcile that restores it changes neither
    // the Deployment spec (generation) nor the Gateway status (its transition times stay).
    let gw_version = gw.metadata.resource_version.clone();
    cluster.kubectl([
        "-n",
        NS,
        "label",
        "service",
        "wp",
        "--overwrite",
        "gateway.networking.k8s.io/gateway-class-name=tampered",
    ])?;
    eventually("the tampered service label restored", || async {
        let s = services.get("wp").await?;
        let class = s.metadata.labels.unwrap_or_default().remove("gateway.networking.k8s.io/gateway-class-name");
        Ok((class.as_deref() == Some("ambit-waypoint")).then_some(()))
    })
    .await?;
    let dep = deployments.get("wp").await?;
    assert_eq!(dep.metadata.generation, Some(1), "repeated applies must not change the deployment spec");
    let managers: Vec<_> = dep.metadata.managed_fields.iter().flatten().map(|m| m.manager.clone()).collect();
    assert!(managers.iter().any(|m| m.as_deref() == Some("ambit-controller")), "{managers:?}");
    let gw = gateways.get("wp").await?;
    assert_eq!(gw.metadata.resource_version, gw_version, "an unchanged status must not be written");
    step(&mut clock, "a no-op reconcile writes nothing");

    // The other class: no objects, no status.
    assert!(deployments.get_opt("ingress").await?.is_none(), "a non-waypoint Gateway got a Deployment");
    assert!(services.get_opt("ingress").await?.is_none(), "a non-waypoint Gateway got a Service");
    assert!(accounts.get_opt("ingress").await?.is_none(), "a non-waypoint Gateway got a ServiceAccount");
    let ingress = gateways.get("ingress").await?;
    assert!(ingress.data.get("status").is_none_or(|s| s.get("conditions").is_none()), "{:?}", ingress.data);

    // `istio-waypoint` works too; a Gateway that stops being a waypoint loses its objects.
    cluster.apply(&gateway("wp2", "istio-waypoint"))?;
    eventually("the istio-waypoint deployment", || async { Ok(deployments.get_opt("wp2").await?) }).await?;
    step(&mut clock, "an istio-waypoint Gateway deployed");
    cluster.apply(&gateway("wp2", "some-other-class"))?;
    eventually("wp2's objects removed after its class changed", || async {
        let gone = deployments.get_opt("wp2").await?.is_none()
            && services.get_opt("wp2").await?.is_none()
            && accounts.get_opt("wp2").await?.is_none();
        Ok(gone.then_some(()))
    })
    .await?;
    step(&mut clock, "class changed away from waypoint: objects removed");

    // Deleting the Gateway lets the garbage collector remove what it owned.
    cluster.kubectl(["-n", NS, "delete", "gateway", "wp", "--wait=true"])?;
    eventually_within(GC_TIMEOUT, "deployment, service and service account gone", || async {
        let gone = deployments.get_opt("wp").await?.is_none()
            && services.get_opt("wp").await?.is_none()
            && accounts.get_opt("wp").await?.is_none();
        Ok(gone.then_some(()))
    })
    .await?;
    step(&mut clock, "garbage collection after deleting the Gateway");

    assert!(!controller.is_finished(), "the controller must keep running");
    controller.abort();
    Ok(())
}
