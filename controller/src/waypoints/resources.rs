//! The objects a waypoint Gateway owns: a ServiceAccount, a Deployment and a
//! Service, all named after the Gateway in its namespace. Pure builders, so
//! what is applied can be checked without an API server.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, PodSpec,
    PodTemplateSpec, Probe, ProjectedVolumeSource, ResourceRequirements, Service, ServiceAccount,
    ServiceAccountTokenProjection, ServicePort, ServiceSpec, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::WaypointSettings;
use crate::ca::root_configmap::ROOT_CERT_CONFIGMAP;
/// Label that ties the pods and the Service to their Gateway (Gateway API convention); the model reads it too.
pub use crate::model::workloads::GATEWAY_NAME_LABEL;

/// Label recording the Gateway's class on everything we create.
pub const GATEWAY_CLASS_LABEL: &str = "gateway.networking.k8s.io/gateway-class-name";
/// Label marking the objects this controller manages; the watches select on it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`], also the server-side-apply field manager.
pub const MANAGER: &str = "ambit-controller";
/// Where the waypoint finds its projected service-account token (audience `ambit-ca` by default), which it presents
/// to the controller for its xDS stream and its certificate.
pub const TOKEN_DIR: &str = "/var/run/secrets/tokens";
/// The token's file name in [`TOKEN_DIR`].
pub const TOKEN_FILE: &str = "ambit-ca-token";
/// Where the waypoint finds the mesh root (`root-cert.pem`, its `--mesh-root` default).
pub const ROOT_DIR: &str = "/var/run/secrets/ambit";
/// HBONE listener of the waypoint.
pub const HBONE_PORT: i32 = 15008;
/// Readiness endpoint (`/healthz/ready`).
pub const READINESS_PORT: i32 = 15021;
/// Prometheus metrics (`/metrics`).
pub const METRICS_PORT: i32 = 15020;

/// The Gateway a set of objects belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Namespace of the Gateway (and of everything it owns).
    pub namespace: String,
    /// Name of the Gateway (and of everything it owns).
    pub name: String,
    /// The Gateway's uid, for the owner reference.
    pub uid: String,
    /// Its class (`ambit-waypoint` or `istio-waypoint`).
    pub class: String,
}

impl Owner {
    /// The controller owner reference to the Gateway. `blockOwnerDeletion` stays
    /// unset: setting it needs update rights on `gateways/finalizers`, and
    /// background deletion does not need it.
    pub fn reference(&self) -> OwnerReference {
        OwnerReference {
            api_version: "gateway.networking.k8s.io/v1".into(),
            kind: "Gateway".into(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            controller: Some(true),
            block_owner_deletion: None,
        }
    }

    /// Labels on every owned object (and the pods).
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (GATEWAY_NAME_LABEL.to_string(), self.name.clone()),
            (GATEWAY_CLASS_LABEL.to_string(), self.class.clone()),
            (MANAGED_BY_LABEL.to_string(), MANAGER.to_string()),
        ])
    }

    fn meta(&self) -> ObjectMeta {
        ObjectMeta {
            name: Some(self.name.clone()),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels()),
            owner_references: Some(vec![self.reference()]),
            ..ObjectMeta::default()
        }
    }

    fn selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(GATEWAY_NAME_LABEL.to_string(), self.name.clone())])
    }
}

/// The waypoint's service account: its SPIFFE identity is `ns/<ns>/sa/<name>`.
pub fn service_account(owner: &Owner) -> ServiceAccount {
    ServiceAccount { metadata: owner.meta(), ..ServiceAccount::default() }
}

/// The waypoint Service; its ClusterIP becomes the Gateway's address.
pub fn service(owner: &Owner) -> Service {
    let port = |name: &str, port: i32, app_protocol: Option<&str>| ServicePort {
        name: Some(name.into()),
        port,
        protocol: Some("TCP".into()),
        target_port: Some(IntOrString::Int(port)),
        app_protocol: app_protocol.map(Into::into),
        ..ServicePort::default()
    };
    Service {
        metadata: owner.meta(),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(owner.selector()),
            ports: Some(vec![port("mesh", HBONE_PORT, Some("all")), port("status-port", READINESS_PORT, None)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The waypoint Deployment: one proxy container with the settings' image and resources.
pub fn deployment(owner: &Owner, settings: &WaypointSettings) -> Deployment {
    let mut pod_labels = owner.labels();
    // A waypoint is itself a mesh proxy: ztunnel must not capture its traffic.
    pod_labels.insert("istio.io/dataplane-mode".into(), "none".into());
    let container_port = |name: &str, port: i32| ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    };
    let field_env = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..ObjectFieldSelector::default() }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("INSTANCE_IP", "status.podIP"),
        field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        EnvVar { name: "WAYPOINT_NAME".into(), value: Some(owner.name.clone()), ..EnvVar::default() },
    ];
    if let Some(addr) = &settings.xds_address {
        env.push(EnvVar { name: "XDS_ADDRESS".into(), value: Some(addr.clone()), ..EnvVar::default() });
    }
    let quantities = |cpu: &Option<String>, memory: &Option<String>| {
        let map: BTreeMap<String, Quantity> = [("cpu", cpu), ("memory", memory)]
            .into_iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k.to_string(), Quantity(v))))
            .collect();
        (!map.is_empty()).then_some(map)
    };
    let container = Container {
        name: "waypoint".into(),
        image: Some(settings.image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        ports: Some(vec![
            container_port("hbone", HBONE_PORT),
            container_port("status-port", READINESS_PORT),
            container_port("metrics", METRICS_PORT),
        ]),
        env: Some(env),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz/ready".into()),
                port: IntOrString::Int(READINESS_PORT),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(5),
            ..Probe::default()
        }),
        resources: Some(ResourceRequirements {
            requests: quantities(&settings.cpu_request, &settings.memory_request),
            limits: quantities(&settings.cpu_limit, &settings.memory_limit),
            ..ResourceRequirements::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "ambit-token".into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "ambit-mesh-root".into(),
                mount_path: ROOT_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    // The waypoint's own identity, proven to the controller (TokenReview) as ztunnel proves its node.
    let token = Volume {
        name: "ambit-token".into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(settings.token_audience.clone()),
                    expiration_seconds: Some(43_200),
                    path: TOKEN_FILE.into(),
                }),
                ..VolumeProjection::default()
            }]),
            ..ProjectedVolumeSource::default()
        }),
        ..Volume::default()
    };
    // The mesh root the controller publishes in the waypoint's namespace: it verifies the controller's certificate.
    let root = Volume {
        name: "ambit-mesh-root".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: ROOT_CERT_CONFIGMAP.into(),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    };
    Deployment {
        metadata: owner.meta(),
        spec: Some(DeploymentSpec {
            replicas: Some(settings.replicas),
            selector: LabelSelector { match_labels: Some(owner.selector()), ..LabelSelector::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([
                        ("prometheus.io/scrape".to_string(), "true".to_string()),
                        ("prometheus.io/port".to_string(), METRICS_PORT.to_string()),
                        ("prometheus.io/path".to_string(), "/metrics".to_string()),
                    ])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(owner.name.clone()),
                    containers: vec![container],
                    volumes: Some(vec![token, root]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        Owner { namespace: "shop".into(), name: "waypoint".into(), uid: "1234".into(), class: "istio-waypoint".into() }
    }

    #[test]
    fn deployment_runs_the_configured_image_with_the_mesh_ports() {
        let settings = WaypointSettings {
            image: "example/waypoint:1".into(),
            cpu_request: Some("100m".into()),
            memory_request: Some("128Mi".into()),
            memory_limit: Some("1Gi".into()),
            ..WaypointSettings::default()
        };
        let d = deployment(&owner(), &settings);
        let meta = &d.metadata;
        assert_eq!(meta.name.as_deref(), Some("waypoint"));
        assert_eq!(meta.namespace.as_deref(), Some("shop"));
        let owners = meta.owner_references.as_ref().unwrap();
        assert_eq!(owners[0].uid, "1234");
        assert_eq!(owners[0].kind, "Gateway");
        assert_eq!(owners[0].controller, Some(true));
        let spec = d.spec.unwrap();
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.service_account_name.as_deref(), Some("waypoint"));
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("example/waypoint:1"));
        let ports: Vec<i32> = c.ports.as_ref().unwrap().iter().map(|p| p.container_port).collect();
        assert_eq!(ports, [15008, 15021, 15020]);
        let res = c.resources.as_ref().unwrap();
        let req = res.requests.as_ref().unwrap();
        assert_eq!(req["cpu"].0, "100m");
        assert_eq!(req["memory"].0, "128Mi");
        let lim = res.limits.as_ref().unwrap();
        assert_eq!(lim.len(), 1, "only the memory limit was set");
        // The selector must match the pods, or the Deployment is rejected.
        let labels = spec.template.metadata.unwrap().labels.unwrap();
        for (k, v) in spec.selector.match_labels.unwrap() {
            assert_eq!(labels.get(&k), Some(&v));
        }
        assert_eq!(labels["istio.io/dataplane-mode"], "none");
        let pod = d_pod(&owner(), &settings);
        let projected = pod.volumes.as_ref().unwrap()[0].projected.clone().unwrap().sources.unwrap()[0].clone();
        let token = projected.service_account_token.unwrap();
        assert_eq!((token.audience.as_deref(), token.path.as_str()), (Some("ambit-ca"), TOKEN_FILE));
        let mount = &pod.containers[0].volume_mounts.as_ref().unwrap()[0];
        assert_eq!((mount.mount_path.as_str(), mount.read_only), (TOKEN_DIR, Some(true)));
        // The mesh root from the ConfigMap the controller publishes in the namespace, where the waypoint reads it.
        let root = &pod.volumes.as_ref().unwrap()[1];
        assert_eq!(root.config_map.as_ref().unwrap().name, ROOT_CERT_CONFIGMAP);
        let mount = &pod.containers[0].volume_mounts.as_ref().unwrap()[1];
        assert_eq!((mount.name.as_str(), mount.mount_path.as_str()), (root.name.as_str(), ROOT_DIR));
    }

    fn d_pod(owner: &Owner, settings: &WaypointSettings) -> k8s_openapi::api::core::v1::PodSpec {
        deployment(owner, settings).spec.unwrap().template.spec.unwrap()
    }

    #[test]
    fn service_selects_the_waypoint_pods_on_hbone_and_readiness_ports() {
        let s = service(&owner());
        let spec = s.spec.unwrap();
        assert_eq!(spec.selector.unwrap(), BTreeMap::from([(GATEWAY_NAME_LABEL.to_string(), "waypoint".to_string())]));
        let ports: Vec<(String, i32)> = spec.ports.unwrap().into_iter().map(|p| (p.name.unwrap(), p.port)).collect();
        assert_eq!(ports, [("mesh".into(), 15008), ("status-port".into(), 15021)]);
        assert_eq!(s.metadata.labels.unwrap()[MANAGED_BY_LABEL], MANAGER);
    }

    #[test]
    fn no_resources_are_requested_when_the_settings_name_none() {
        let settings = WaypointSettings { cpu_request: None, memory_request: None, ..WaypointSettings::default() };
        let d = deployment(&owner(), &settings);
        let res = d.spec.unwrap().template.spec.unwrap().containers[0].resources.clone().unwrap();
        assert_eq!(res.requests, None);
        assert_eq!(res.limits, None);
    }
}
