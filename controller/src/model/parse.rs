//! Kubernetes YAML (multi-document, or `kind: List`) to [`ClusterObject`]s,
//! dispatching on `apiVersion`/`kind`. A document that does not parse is a
//! [`Rejection`]; the other documents still count.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml::Value;

use super::objects::ClusterObject;
use super::Rejection;

/// Kind used in rejections for text that is not a Kubernetes object at all.
pub const FILE_KIND: &str = "File";

/// Parses every document of `text`; `origin` (a file name) labels rejections.
pub fn parse_documents(text: &str, origin: &str) -> (Vec<ClusterObject>, Vec<Rejection>) {
    let mut objects = Vec::new();
    let mut rejections = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        match Value::deserialize(doc) {
            Ok(value) => parse_value(value, origin, &mut objects, &mut rejections),
            Err(e) => {
                // A syntax error ends the stream: later documents cannot be located.
                rejections.push(Rejection {
                    kind: FILE_KIND.into(),
                    namespace: String::new(),
                    name: origin.into(),
                    reason: format!("document {}: invalid YAML: {e}", i + 1),
                });
                break;
            }
        }
    }
    (objects, rejections)
}

fn parse_value(value: Value, origin: &str, objects: &mut Vec<ClusterObject>, rejections: &mut Vec<Rejection>) {
    if value.is_null() {
        return; // an empty document (`---` at the end)
    }
    let str_field = |k: &str| value.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let (api_version, kind) = (str_field("apiVersion"), str_field("kind"));
    let meta = value.get("metadata");
    let meta_str = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str).unwrap_or("").to_owned();
    let (name, mut namespace) = (meta_str("name"), meta_str("namespace"));
    let reject = |rejections: &mut Vec<Rejection>, kind: &str, ns: &str, reason: String| {
        rejections.push(Rejection {
            kind: if kind.is_empty() { FILE_KIND.into() } else { kind.into() },
            namespace: ns.into(),
            name: if name.is_empty() { origin.into() } else { name.clone() },
            reason,
        })
    };
    if kind == "List" {
        match value.get("items").and_then(Value::as_sequence) {
            Some(items) => {
                for item in items {
                    parse_value(item.clone(), origin, objects, rejections);
                }
            }
            None => reject(rejections, &kind, "", format!("{origin}: List without items")),
        }
        return;
    }
    if api_version.is_empty() || kind.is_empty() {
        reject(rejections, &kind, &namespace, format!("{origin}: apiVersion and kind are required"));
        return;
    }
    let cluster_scoped = kind == "Namespace";
    if !cluster_scoped && namespace.is_empty() {
        namespace = "default".into(); // as kubectl applies it
    }
    if name.is_empty() {
        reject(rejections, &kind, &namespace, format!("{origin}: metadata.name is required"));
        return;
    }
    let group = api_version.split_once('/').map_or("", |(g, _)| g);
    let parsed = match (group, kind.as_str()) {
        ("", "Namespace") if api_version == "v1" => typed(value, ClusterObject::Namespace),
        ("", "Pod") if api_version == "v1" => typed(value, ClusterObject::Pod),
        ("", "Service") if api_version == "v1" => typed(value, ClusterObject::Service),
        ("discovery.k8s.io", "EndpointSlice") => typed(value, ClusterObject::EndpointSlice),
        ("security.istio.io", "AuthorizationPolicy") => typed(value, ClusterObject::AuthorizationPolicy),
        ("security.istio.io", "PeerAuthentication") => typed(value, ClusterObject::PeerAuthentication),
        ("gateway.networking.k8s.io", "Gateway") => typed(value, ClusterObject::Gateway),
        ("gateway.networking.k8s.io", "HTTPRoute") => typed(value, ClusterObject::HttpRoute),
        ("gateway.networking.k8s.io", "GRPCRoute") => typed(value, ClusterObject::GrpcRoute),
        ("gateway.networking.k8s.io", "ReferenceGrant") => typed(value, ClusterObject::ReferenceGrant),
        ("networking.istio.io", "VirtualService") => typed(value, ClusterObject::VirtualService),
        ("networking.istio.io", "DestinationRule") => typed(value, ClusterObject::DestinationRule),
        ("split.smi-spec.io", "TrafficSplit") if api_version == "split.smi-spec.io/v1alpha1" => {
            let why = "split.smi-spec.io/v1alpha1 is not served (its weights are quantities): use v1alpha2 or later";
            reject(rejections, &kind, &namespace, format!("{origin}: {why}"));
            return;
        }
        ("split.smi-spec.io", "TrafficSplit") => typed(value, ClusterObject::TrafficSplit),
        _ => {
            if super::unsupported::find(group, &kind).is_some() {
                let message = super::unsupported::message(&kind);
                tracing::info!(%origin, %kind, %namespace, %name, "{message}");
            } else {
                tracing::debug!(%origin, %api_version, %kind, %name, "skipping a kind the model does not use");
            }
            return;
        }
    };
    match parsed {
        Ok(mut obj) => {
            set_namespace(&mut obj, namespace);
            objects.push(obj);
        }
        Err(e) => reject(rejections, &kind, &namespace, format!("{origin}: {e}")),
    }
}

fn typed<T: DeserializeOwned>(
    value: Value,
    wrap: impl FnOnce(Box<T>) -> ClusterObject,
) -> Result<ClusterObject, serde_yaml::Error> {
    serde_yaml::from_value(value).map(|t| wrap(Box::new(t)))
}

/// Fills the defaulted namespace in, so later code never sees `None`.
fn set_namespace(obj: &mut ClusterObject, namespace: String) {
    let meta = match obj {
        ClusterObject::Namespace(_) => return,
        ClusterObject::Pod(o) => &mut o.metadata,
        ClusterObject::Service(o) => &mut o.metadata,
        ClusterObject::EndpointSlice(o) => &mut o.metadata,
        ClusterObject::AuthorizationPolicy(o) => &mut o.metadata,
        ClusterObject::PeerAuthentication(o) => &mut o.metadata,
        ClusterObject::Gateway(o) => &mut o.metadata,
        ClusterObject::HttpRoute(o) => &mut o.metadata,
        ClusterObject::GrpcRoute(o) => &mut o.metadata,
        ClusterObject::ReferenceGrant(o) => &mut o.metadata,
        ClusterObject::VirtualService(o) => &mut o.metadata,
        ClusterObject::TrafficSplit(o) => &mut o.metadata,
        ClusterObject::DestinationRule(o) => &mut o.metadata,
    };
    meta.namespace = Some(namespace);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_text_yields_each_known_kind_and_skips_unknown_ones() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
---
apiVersion: v1
kind: Pod
metadata: {name: p}
---
"#;
        let (objects, rejections) = parse_documents(text, "x.yaml");
        assert!(rejections.is_empty(), "{rejections:?}");
        assert_eq!(objects.len(), 2);
        assert_eq!(objects[0].key(), (String::new(), "a".into()));
        assert_eq!(objects[1].kind(), "Pod");
        assert_eq!(objects[1].key(), ("default".into(), "p".into()), "namespace defaults like kubectl");
    }

    #[test]
    fn a_bad_document_is_rejected_by_name_and_the_others_are_kept() {
        let text = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad, namespace: ns}
spec: {action: PERMIT}
---
apiVersion: v1
kind: Service
metadata: {name: s, namespace: ns}
"#;
        let (objects, rejections) = parse_documents(text, "x.yaml");
        assert_eq!(objects.len(), 1);
        assert_eq!(rejections.len(), 1);
        let r = &rejections[0];
        assert_eq!((r.kind.as_str(), r.namespace.as_str(), r.name.as_str()), ("AuthorizationPolicy", "ns", "bad"));
        assert!(r.reason.contains("PERMIT"), "{}", r.reason);
    }

    #[test]
    fn invalid_yaml_is_a_file_rejection() {
        let (objects, rejections) = parse_documents("kind: [unclosed\n", "broken.yaml");
        assert!(objects.is_empty());
        assert_eq!(rejections[0].kind, FILE_KIND);
        assert_eq!(rejections[0].name, "broken.yaml");
    }

    #[test]
    fn list_items_are_parsed() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n- {apiVersion: v1, kind: Namespace, metadata: {name: b}}\n";
        let (objects, rejections) = parse_documents(text, "l.yaml");
        assert!(rejections.is_empty());
        assert_eq!(objects.len(), 2);
    }
}
