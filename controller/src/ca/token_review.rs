//! Kubernetes mode: a ztunnel proves its node with its service-account token;
//! any other service account (a waypoint) proves its own identity with its
//! token, and nothing more: such a caller is a workload, on no node it could
//! speak for.
//!
//! The controller sends the bearer token to the API server in a `TokenReview`
//! (audience `ambit-ca`). The token must belong to the ztunnel service account
//! and be bound to a pod; since Kubernetes 1.30 the review then names the pod's
//! node in `status.user.extra["authentication.kubernetes.io/node-name"]`, which
//! becomes the [`Caller`]'s node.
//!
//! A review is a network round trip, and every xDS stream and certificate
//! request starts with one. So answers are cached (60 s by default), and
//! concurrent calls with the same uncached token share one review: a ztunnel
//! asking for many certificates at once costs the API server one request.
//! The review runs in its own task, so a caller that goes away does not leave
//! the others waiting on a review nobody drives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use tokio::sync::watch;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use super::auth::{bearer_token, AsyncCallerAuthenticator, AuthFuture, Caller};

/// The audience ztunnel tokens are requested for (the DaemonSet's projected token).
pub const DEFAULT_AUDIENCE: &str = "ambit-ca";
/// The Kubernetes user of the ztunnel service account in the default install.
pub const DEFAULT_ZTUNNEL_IDENTITY: &str = "system:serviceaccount:ambit-system:ztunnel";
/// How long a review's answer is trusted.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60);
/// `user.extra` key under which the API server names the node of a token's bound pod.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// Refusals are remembered briefly: long enough to absorb a retry storm with a
/// bad token, short enough that a fixed cluster is noticed quickly.
const REFUSAL_TTL: Duration = Duration::from_secs(5);
/// Bounds on memory held for tokens, whatever callers send.
const MAX_CACHED: usize = 16_384;
const MAX_IN_FLIGHT: usize = 1_024;

/// A review's answer: the caller, or the refusal's code and message.
type Verdict = Result<Caller, (Code, String)>;

fn verdict(result: &Result<Caller, Status>) -> Verdict {
    result.clone().map_err(|s| (s.code(), s.message().to_owned()))
}

fn status(verdict: Verdict) -> Result<Caller, Status> {
    verdict.map_err(|(code, msg)| Status::new(code, msg))
}

/// A cached answer.
#[derive(Debug, Clone)]
struct Entry {
    result: Verdict,
    expires: Instant,
}

/// Answers by token, and the reviews running now (each publishes its verdict once).
#[derive(Debug, Default)]
struct Cache {
    entries: HashMap<String, Entry>,
    in_flight: HashMap<String, watch::Receiver<Option<Verdict>>>,
}

impl Cache {
    fn get(&self, token: &str, now: Instant) -> Option<Result<Caller, Status>> {
        let entry = self.entries.get(token).filter(|e| e.expires > now)?;
        Some(status(entry.result.clone()))
    }

    fn insert(&mut self, token: &str, result: &Result<Caller, Status>, now: Instant, ttl: Duration) {
        let ttl = match result {
            Ok(_) => ttl,
            // Only the token's own verdict is worth remembering; an unreachable
            // API server is retried on the next call.
            Err(s) if s.code() == Code::Unauthenticated => REFUSAL_TTL.min(ttl),
            Err(_) => return,
        };
        if ttl.is_zero() {
            return;
        }
        if self.entries.len() >= MAX_CACHED {
            self.entries.retain(|_, e| e.expires > now);
            if self.entries.len() >= MAX_CACHED {
                // Still full of live entries: forget them all rather than grow;
                // the cost is one review per caller.
                self.entries.clear();
            }
        }
        self.entries.insert(token.to_owned(), Entry { result: verdict(result), expires: now + ttl });
    }
}

/// Authenticates ztunnels by a `TokenReview` of their service-account token.
#[derive(Clone)]
pub struct TokenReviewAuthenticator {
    client: kube::Client,
    audience: String,
    allowed_users: Vec<String>,
    ttl: Duration,
    cache: Arc<Mutex<Cache>>,
}

impl std::fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("audience", &self.audience)
            .field("allowed_users", &self.allowed_users)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl TokenReviewAuthenticator {
    /// Reviews tokens with `client`, for audience [`DEFAULT_AUDIENCE`], admitting
    /// only [`DEFAULT_ZTUNNEL_IDENTITY`], caching for [`DEFAULT_CACHE_TTL`].
    pub fn new(client: kube::Client) -> Self {
        TokenReviewAuthenticator {
            client,
            audience: DEFAULT_AUDIENCE.to_owned(),
            allowed_users: vec![DEFAULT_ZTUNNEL_IDENTITY.to_owned()],
            ttl: DEFAULT_CACHE_TTL,
            cache: Arc::default(),
        }
    }

    /// Requires tokens issued for `audience` instead.
    pub fn with_audience(mut self, audience: impl Into<String>) -> Self {
        self.audience = audience.into();
        self
    }

    /// Admits these Kubernetes users (`system:serviceaccount:<ns>:<name>`) instead.
    pub fn with_allowed_users(mut self, users: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.allowed_users = users.into_iter().map(Into::into).collect();
        self
    }

    /// Trusts an admitted token this long (zero: review on every call).
    pub fn with_cache_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Asks the API server about `token` (no cache) and checks the answer.
    pub async fn review(&self, token: &str) -> Result<Caller, Status> {
        let request = TokenReview {
            spec: TokenReviewSpec { token: token.to_owned(), audiences: Some(vec![self.audience.clone()]) },
            ..Default::default()
        };
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let answer = api.create(&PostParams::default(), &request).await.map_err(|e| {
            tracing::warn!(error = %e, "token review failed");
            Status::unavailable(format!("cannot review the token with the API server: {e}"))
        })?;
        caller_from_review(answer.status.as_ref(), &self.audience, &self.allowed_users)
    }

    /// The cached answer for `token`, or the verdict of a review: the one
    /// already running for it, else a new one (then cached).
    pub async fn review_cached(&self, token: &str) -> Result<Caller, Status> {
        let mut running = {
            let mut cache = self.lock();
            if let Some(hit) = cache.get(token, Instant::now()) {
                return hit;
            }
            match cache.in_flight.get(token) {
                // A review whose task died (it cannot, short of a panic) is replaced.
                Some(rx) if rx.has_changed().is_ok() => rx.clone(),
                _ => {
                    if cache.in_flight.len() >= MAX_IN_FLIGHT {
                        return Err(Status::unavailable("too many token reviews in progress; retry later"));
                    }
                    let rx = self.spawn_review(token);
                    cache.in_flight.insert(token.to_owned(), rx.clone());
                    rx
                }
            }
        };
        let verdict = running
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Status::unavailable("the token review ended without an answer; retry"))?
            .clone();
        match verdict {
            Some(v) => status(v),
            None => Err(Status::internal("bug: a published token review has no verdict")),
        }
    }

    /// Reviews `token` in a task of its own that caches the verdict, forgets
    /// the in-flight entry and then publishes the verdict.
    fn spawn_review(&self, token: &str) -> watch::Receiver<Option<Verdict>> {
        let (tx, rx) = watch::channel(None);
        let this = self.clone();
        let token = token.to_owned();
        tokio::spawn(async move {
            let result = this.review(&token).await;
            {
                let mut cache = this.lock();
                cache.in_flight.remove(&token);
                cache.insert(&token, &result, Instant::now(), this.ttl);
            }
            tx.send_replace(Some(verdict(&result)));
        });
        rx
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic while holding the lock leaves maps that are still valid.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Checks a TokenReview's answer: authenticated, for `audience`; one of
/// `allowed_users` (node proxies) bound to a pod on a node, or any other
/// service account, which is a workload with its own identity only.
pub fn caller_from_review(
    status: Option<&TokenReviewStatus>,
    audience: &str,
    allowed_users: &[String],
) -> Result<Caller, Status> {
    let status = status.ok_or_else(|| Status::unavailable("the token review has no status"))?;
    if status.authenticated != Some(true) {
        let why = status.error.as_deref().unwrap_or("not authenticated");
        return Err(Status::unauthenticated(format!("token refused: {why}")));
    }
    // The API server answers with the requested audiences the token is valid
    // for; an authenticator configured without audiences would leave it empty.
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == audience) {
        return Err(Status::unauthenticated(format!(
            "token is not valid for audience {audience:?} (valid for {audiences:?})"
        )));
    }
    let user = status.user.as_ref();
    let username = user.and_then(|u| u.username.as_deref()).unwrap_or_default();
    if !allowed_users.iter().any(|a| a == username) {
        return match service_account_of(username) {
            Some((ns, sa)) => Ok(Caller::workload(ns, sa)),
            None => Err(Status::unauthenticated(format!(
                "{username:?} is neither a node proxy ({allowed_users:?}) nor a service account"
            ))),
        };
    }
    let node = user
        .and_then(|u| u.extra.as_ref())
        .and_then(|extra| extra.get(NODE_NAME_EXTRA))
        .and_then(|values| values.first())
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            Status::unauthenticated(format!(
                "token of {username} is not bound to a pod on a node (no {NODE_NAME_EXTRA})"
            ))
        })?;
    Ok(Caller { node: Some(node.to_owned()), service_account: service_account_of(username) })
}

/// `(namespace, name)` of a `system:serviceaccount:<namespace>:<name>` user.
fn service_account_of(username: &str) -> Option<(String, String)> {
    let (ns, name) = username.strip_prefix("system:serviceaccount:")?.split_once(':')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains(':')).then(|| (ns.to_owned(), name.to_owned()))
}

impl AsyncCallerAuthenticator for TokenReviewAuthenticator {
    fn authenticate_async<'a>(&'a self, metadata: &'a MetadataMap) -> AuthFuture<'a> {
        Box::pin(async move {
            let token = bearer_token(metadata)?;
            self.review_cached(token).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use std::collections::BTreeMap;

    fn answer(user: &str, node: Option<&str>, audiences: &[&str]) -> TokenReviewStatus {
        let mut extra = BTreeMap::new();
        if let Some(node) = node {
            extra.insert(NODE_NAME_EXTRA.to_owned(), vec![node.to_owned()]);
        }
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo { username: Some(user.to_owned()), extra: Some(extra), ..Default::default() }),
            error: None,
        }
    }

    fn allowed() -> Vec<String> {
        vec![DEFAULT_ZTUNNEL_IDENTITY.to_owned()]
    }

    #[test]
    fn an_authenticated_ztunnel_token_bound_to_a_pod_gives_its_node() {
        let status = answer(DEFAULT_ZTUNNEL_IDENTITY, Some("node-1"), &["ambit-ca"]);
        let caller = caller_from_review(Some(&status), "ambit-ca", &allowed()).unwrap();
        assert_eq!(caller.node.as_deref(), Some("node-1"), "the node comes from the token's bound pod");
        assert_eq!(caller.service_account, Some(("ambit-system".to_owned(), "ztunnel".to_owned())));
    }

    #[test]
    fn another_service_account_is_a_workload_on_no_node_even_when_its_pod_is_bound_to_one() {
        let status = answer("system:serviceaccount:mesh:waypoint", Some("node-1"), &["ambit-ca"]);
        let caller = caller_from_review(Some(&status), "ambit-ca", &allowed()).unwrap();
        assert_eq!(caller, Caller::workload("mesh", "waypoint"));
        assert_eq!(caller.node, None, "a workload must never speak for its node's identities");
        let unbound = answer("system:serviceaccount:mesh:waypoint", None, &["ambit-ca"]);
        assert_eq!(caller_from_review(Some(&unbound), "ambit-ca", &allowed()).unwrap(), caller);
        let wrong_audience = answer("system:serviceaccount:mesh:waypoint", None, &["api"]);
        assert!(caller_from_review(Some(&wrong_audience), "ambit-ca", &allowed()).is_err());
    }

    #[test]
    fn only_service_account_users_have_an_identity_of_their_own() {
        assert_eq!(service_account_of("system:serviceaccount:ns:sa"), Some(("ns".into(), "sa".into())));
        for user in ["admin", "system:serviceaccount:ns", "system:serviceaccount::sa", "system:serviceaccount:a:b:c"] {
            assert_eq!(service_account_of(user), None, "{user}");
        }
    }

    #[test]
    fn refusals_name_their_reason() {
        let mut not_auth = answer(DEFAULT_ZTUNNEL_IDENTITY, Some("n"), &["ambit-ca"]);
        not_auth.authenticated = Some(false);
        not_auth.error = Some("token has been invalidated".into());
        for (status, want) in [
            (not_auth, "token has been invalidated"),
            (answer(DEFAULT_ZTUNNEL_IDENTITY, Some("n"), &["other"]), "audience"),
            (answer("admin", Some("n"), &["ambit-ca"]), "neither a node proxy"),
            (answer(DEFAULT_ZTUNNEL_IDENTITY, None, &["ambit-ca"]), "not bound to a pod"),
            (answer(DEFAULT_ZTUNNEL_IDENTITY, Some(" "), &["ambit-ca"]), "not bound to a pod"),
        ] {
            let err = caller_from_review(Some(&status), "ambit-ca", &allowed()).unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
            assert!(err.message().contains(want), "{} does not say {want}", err.message());
        }
        let err = caller_from_review(None, "ambit-ca", &allowed()).unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
    }

    #[test]
    fn the_cache_keeps_admissions_for_the_ttl_and_refusals_briefly() {
        let mut cache = Cache::default();
        let t0 = Instant::now();
        let ok = Ok(Caller::on_node("n1"));
        cache.insert("good", &ok, t0, Duration::from_secs(60));
        cache.insert("bad", &Err(Status::unauthenticated("nope")), t0, Duration::from_secs(60));
        cache.insert("down", &Err(Status::unavailable("api down")), t0, Duration::from_secs(60));

        let later = t0 + Duration::from_secs(30);
        assert_eq!(cache.get("good", later).unwrap().unwrap().node.as_deref(), Some("n1"));
        assert!(cache.get("bad", later).is_none(), "refusals expire after {REFUSAL_TTL:?}");
        let bad = cache.get("bad", t0 + Duration::from_secs(1)).unwrap().unwrap_err();
        assert_eq!((bad.code(), bad.message()), (Code::Unauthenticated, "nope"));
        assert!(cache.get("down", t0).is_none(), "an unreachable API server is not a verdict");
        assert!(cache.get("good", t0 + Duration::from_secs(61)).is_none());
    }

    #[test]
    fn a_zero_ttl_caches_nothing() {
        let mut cache = Cache::default();
        let now = Instant::now();
        cache.insert("t", &Ok(Caller::on_node("n")), now, Duration::ZERO);
        assert!(cache.get("t", now).is_none());
    }

    #[test]
    fn the_cache_stays_bounded() {
        let mut cache = Cache::default();
        let now = Instant::now();
        for i in 0..MAX_CACHED + 10 {
            cache.insert(&format!("t{i}"), &Ok(Caller::on_node("n")), now, DEFAULT_CACHE_TTL);
        }
        assert!(cache.entries.len() <= MAX_CACHED);
    }
}
