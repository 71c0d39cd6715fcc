//! A Prometheus label value shared by every metric that names the same
//! workload or service: cloned as a pointer, never copied per connection or
//! request. Empty renders as `unknown`, as Istio's proxies write it.

use std::fmt::Write;
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// A label value; empty is `unknown`.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct Value(Option<Arc<str>>);

impl Value {
    pub fn new(s: &str) -> Self {
        Value((!s.is_empty()).then(|| Arc::from(s)))
    }

    pub fn is_unknown(&self) -> bool {
        self.0.is_none()
    }

    /// The value as rendered: `unknown` when empty.
    pub fn as_str(&self) -> &str {
        self.0.as_deref().unwrap_or("unknown")
    }

    /// `self`, or `other` when `self` is unknown.
    pub fn or(self, other: Option<&str>) -> Self {
        if self.is_unknown() {
            Value::new(other.unwrap_or_default())
        } else {
            self
        }
    }
}

impl EncodeLabelValue for Value {
    fn encode(&self, w: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        w.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_unknown_and_or_fills_only_unknown() {
        assert_eq!(Value::new("").as_str(), "unknown");
        assert!(Value::new("").is_unknown());
        assert_eq!(Value::new("").or(Some("b")), Value::new("b"));
        assert_eq!(Value::new("a").or(Some("b")), Value::new("a"));
        assert_eq!(Value::new("").or(None).as_str(), "unknown");
    }
}
