//! Kubernetes mode: a ztunnel proves its node with its service-account token.
//!
//! The controller sends the bearer token to the API server in a `TokenReview`
//! (audience `ambit-ca`). The token must belong to the ztunnel service account
//! and be bound to a pod; since Kubernetes 1.30 the review then names the pod's
//! node in `status.user.extra["authentication.kubernetes.io/node-name"]`, which
//! becomes the [`Caller`]'s node.
//!
//! A review is a network round trip, but tonic interceptors are synchronous.
//! So results are cached (60 s by default) and there are two ways in:
//! - [`AsyncCallerAuthenticator::authenticate_async`] (what the CA and xDS
//!   handlers should call): a cache hit answers at once, a miss awaits the
//!   review;
//! - [`CallerAuthenticator::authenticate`] (usable from [`super::AuthInterceptor`]):
//!   a cache hit answers at once; a miss starts the review in the background and
//!   answers `unavailable` ("retry"), so the caller's next attempt — ztunnels
//!   reconnect with backoff — finds the result.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use super::auth::{bearer_token, BootstrapTokenAuthenticator, Caller, CallerAuthenticator};

/// The audience ztunnel tokens are requested for (the DaemonSet's projected token).
pub const DEFAULT_AUDIENCE: &str = "ambit-ca";
/// The Kubernetes user of the ztunnel service account in the default install.
pub const DEFAULT_ZTUNNEL_IDENTITY: &str = "system:serviceaccount:ambit-system:ztunnel";
/// How long a review's answer is trusted.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60);
/// `user.extra` key under which the API server names the node of a token's bound pod.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// Refusals are remembered briefly: long enough that the synchronous path can
/// report the real reason on the retry, short enough that a fixed cluster is
/// noticed quickly.
const REFUSAL_TTL: Duration = Duration::from_secs(5);
/// Bounds on memory held for tokens, whatever callers send.
const MAX_CACHED: usize = 16_384;
const MAX_IN_FLIGHT: usize = 1_024;

/// Authenticates a gRPC caller from its metadata, possibly over the network.
///
/// Object-safe (it returns a boxed future) so it can be held as
/// `Arc<dyn AsyncCallerAuthenticator>`.
pub trait AsyncCallerAuthenticator: Send + Sync {
    /// The caller, `unauthenticated` when the credential is refused, or
    /// `unavailable` when it cannot be checked now.
    fn authenticate_async<'a>(
        &'a self,
        metadata: &'a MetadataMap,
    ) -> Pin<Box<dyn Future<Output = Result<Caller, Status>> + Send + 'a>>;
}

/// File mode needs no round trip: the bootstrap token is checked in place.
impl AsyncCallerAuthenticator for BootstrapTokenAuthenticator {
    fn authenticate_async<'a>(
        &'a self,
        metadata: &'a MetadataMap,
    ) -> Pin<Box<dyn Future<Output = Result<Caller, Status>> + Send + 'a>> {
        let result = self.authenticate(metadata);
        Box::pin(std::future::ready(result))
    }
}

/// A cached answer: the caller, or the refusal's code and message.
#[derive(Debug, Clone)]
struct Entry {
    result: Result<Caller, (Code, String)>,
    expires: Instant,
}

#[derive(Debug, Default)]
struct Cache {
    entries: HashMap<String, Entry>,
    in_flight: std::collections::HashSet<String>,
}

impl Cache {
    fn get(&self, token: &str, now: Instant) -> Option<Result<Caller, Status>> {
        let entry = self.entries.get(token).filter(|e| e.expires > now)?;
        Some(entry.result.clone().map_err(|(code, msg)| Status::new(code, msg)))
    }

    fn insert(&mut self, token: &str, result: &Result<Caller, Status>, now: Instant, ttl: Duration) {
        let (result, ttl) = match result {
            Ok(caller) => (Ok(caller.clone()), ttl),
            // Only the token's own verdict is worth remembering; an unreachable
            // API server is retried on the next call.
            Err(s) if s.code() == Code::Unauthenticated => {
                (Err((s.code(), s.message().to_owned())), REFUSAL_TTL.min(ttl))
            }
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
        self.entries.insert(token.to_owned(), Entry { result, expires: now + ttl });
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

    /// The cached answer for `token`, or a fresh review (then cached).
    pub async fn review_cached(&self, token: &str) -> Result<Caller, Status> {
        if let Some(hit) = self.lock().get(token, Instant::now()) {
            return hit;
        }
        let result = self.review(token).await;
        self.lock().insert(token, &result, Instant::now(), self.ttl);
        result
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic while holding the lock leaves a map that is still valid.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reviews `token` on the current tokio runtime, caching the result, unless
    /// a review of it is already running or too many are.
    fn review_in_background(&self, token: &str) -> Result<(), Status> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| Status::internal("bug: token review outside a tokio runtime"))?;
        {
            let mut cache = self.lock();
            if cache.in_flight.contains(token) {
                return Ok(());
            }
            if cache.in_flight.len() >= MAX_IN_FLIGHT {
                return Err(Status::unavailable("too many token reviews in progress; retry later"));
            }
            cache.in_flight.insert(token.to_owned());
        }
        let this = self.clone();
        let token = token.to_owned();
        handle.spawn(async move {
            let result = this.review(&token).await;
            let mut cache = this.lock();
            cache.in_flight.remove(&token);
            cache.insert(&token, &result, Instant::now(), this.ttl);
        });
        Ok(())
    }
}

/// Checks a TokenReview's answer: authenticated, for `audience`, one of
/// `allowed_users`, bound to a pod on a node.
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
        return Err(Status::unauthenticated(format!(
            "{username:?} may not request certificates (allowed: {allowed_users:?})"
        )));
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
    Ok(Caller { node: node.to_owned() })
}

impl CallerAuthenticator for TokenReviewAuthenticator {
    fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let token = bearer_token(metadata)?;
        if let Some(hit) = self.lock().get(token, Instant::now()) {
            return hit;
        }
        self.review_in_background(token)?;
        Err(Status::unavailable("token review in progress; retry in a moment"))
    }
}

impl AsyncCallerAuthenticator for TokenReviewAuthenticator {
    fn authenticate_async<'a>(
        &'a self,
        metadata: &'a MetadataMap,
    ) -> Pin<Box<dyn Future<Output = Result<Caller, Status>> + Send + 'a>> {
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
        assert_eq!(caller, Caller { node: "node-1".into() });
    }

    #[test]
    fn refusals_name_their_reason() {
        let mut not_auth = answer(DEFAULT_ZTUNNEL_IDENTITY, Some("n"), &["ambit-ca"]);
        not_auth.authenticated = Some(false);
        not_auth.error = Some("token has been invalidated".into());
        for (status, want) in [
            (not_auth, "token has been invalidated"),
            (answer(DEFAULT_ZTUNNEL_IDENTITY, Some("n"), &["other"]), "audience"),
            (answer("system:serviceaccount:default:app", Some("n"), &["ambit-ca"]), "may not request"),
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
        let ok = Ok(Caller { node: "n1".into() });
        cache.insert("good", &ok, t0, Duration::from_secs(60));
        cache.insert("bad", &Err(Status::unauthenticated("nope")), t0, Duration::from_secs(60));
        cache.insert("down", &Err(Status::unavailable("api down")), t0, Duration::from_secs(60));

        let later = t0 + Duration::from_secs(30);
        assert_eq!(cache.get("good", later).unwrap().unwrap().node, "n1");
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
        cache.insert("t", &Ok(Caller { node: "n".into() }), now, Duration::ZERO);
        assert!(cache.get("t", now).is_none());
    }

    #[test]
    fn the_cache_stays_bounded() {
        let mut cache = Cache::default();
        let now = Instant::now();
        for i in 0..MAX_CACHED + 10 {
            cache.insert(&format!("t{i}"), &Ok(Caller { node: "n".into() }), now, DEFAULT_CACHE_TTL);
        }
        assert!(cache.entries.len() <= MAX_CACHED);
    }

    #[tokio::test]
    async fn the_bootstrap_authenticator_answers_the_async_path_in_place() {
        let auth = BootstrapTokenAuthenticator::new("t").unwrap();
        let mut md = MetadataMap::new();
        md.insert("authorization", "Bearer t".parse().unwrap());
        md.insert("x-ambit-node", "node-9".parse().unwrap());
        let auth: &dyn AsyncCallerAuthenticator = &auth;
        assert_eq!(auth.authenticate_async(&md).await.unwrap().node, "node-9");
    }
}
