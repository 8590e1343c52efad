//! [`FenceService`]: the way of a request through the cache.

use std::future::Future;
use std::mem;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use tower_service::Service;

use crate::body::FenceBody;
use crate::entry::{unix_ms, Entry, Record};
use crate::fill::{Fill, Recorder};
use crate::flight::{self, Reading};
use crate::future::ResponseFuture;
use crate::invalidate;
use crate::key::{self, CacheKey};
use crate::layer::{Counters, Shared};
use crate::policy::{self, RequestPlan};
use crate::status::{CacheStatus, Fwd};
use crate::store::StoreError;
use crate::validation;

/// Caches the responses of the inner service `S`; made by
/// [`FenceLayer`](crate::FenceLayer).
///
/// `GET` requests are looked up and, on a miss, their responses stored when
/// HTTP allows it; `HEAD` requests are answered from the `GET` entry. Every
/// other request goes to `S` untouched. Errors of `S` pass through as they
/// are: the cache adds none, and a store that fails or is slow sends the
/// request to `S` (fail open).
///
/// `S`, its future, its error and the bodies must be `Send + 'static`: a
/// rebuild runs in a task of its own (so that a client hanging up does not
/// cancel it for everyone waiting), and background refreshes call `S` after
/// the triggering response was sent. axum, tonic and hyper services are.
pub struct FenceService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> FenceService<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        FenceService { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for FenceService<S> {
    fn clone(&self) -> Self {
        FenceService {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for FenceService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FenceService")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .finish()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for FenceService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Send,
{
    type Response = Response<FenceBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let shared = &self.shared;
        let matched = if shared.rules.is_empty() {
            None
        } else {
            shared.rules.find(req.method(), req.uri().path())
        };
        let (parts, body) = req.into_parts();
        let route_bypass = matched.as_ref().and_then(|m| m.rule.bypass_reason(&parts));
        let plan = match route_bypass {
            Some(detail) => RequestPlan::Bypass(detail),
            None => policy::plan_request(
                &parts.method,
                &parts.headers,
                shared.client_cache_control,
                &shared.policy,
            ),
        };
        let facts = match plan {
            RequestPlan::Bypass(detail) => {
                Counters::bump(&shared.counters.bypasses);
                let write = invalidate::is_write(shared, &parts.method, &parts.headers)
                    && !matched
                        .as_ref()
                        .is_some_and(|m| m.rule.invalidates_nothing());
                let outcome = if write {
                    Outcome::Write {
                        shared: shared.clone(),
                        uri: parts.uri.clone(),
                        host: parts
                            .headers
                            .get(header::HOST)
                            .and_then(|h| h.to_str().ok())
                            .map(str::to_owned),
                        also: matched
                            .as_ref()
                            .map(|m| m.invalidations())
                            .unwrap_or_default(),
                    }
                } else {
                    Outcome::Pass(shared.clone(), CacheStatus::bypass(detail))
                };
                let fut = self.inner.call(Request::from_parts(parts, body));
                return ResponseFuture::inner(fut, outcome);
            }
            RequestPlan::Lookup(facts) => facts,
        };
        let (key, overrides) = match &matched {
            None => (
                key::derive_from(&shared.key, &parts.method, &parts.uri, &parts.headers),
                policy::Overrides::default(),
            ),
            Some(m) => {
                let rule = m.rule;
                let extra = rule.key_parts(&parts);
                let key = key::derive_with(
                    &shared.key,
                    &parts.method,
                    &parts.uri,
                    &parts.headers,
                    &extra,
                );
                let overrides = policy::Overrides {
                    tags: m.tags(),
                    declared_vary: rule.vary_headers().to_vec(),
                    ttl: rule.ttl_setting(),
                    override_ttl: rule.override_ttl_setting(),
                    grace: rule.grace_setting(),
                    stale_if_error: rule.stale_if_error_setting(),
                    strip_set_cookie: rule.strips_set_cookie(),
                    keyed_by_credential: rule.authorization_keyed(),
                    cookies_shared: rule.cookies_shared(),
                };
                (key, overrides)
            }
        };
        let req = Request::from_parts(parts, body);
        // `poll_ready` readied `self.inner`: take that one for this request
        // and leave a fresh clone behind (tower's clone-and-swap).
        let clone = self.inner.clone();
        let svc = mem::replace(&mut self.inner, clone);
        // A missing entry is being rebuilt in this process: wait for it in
        // memory, without a store round trip.
        let may_join = req.method() == Method::GET
            && facts.may_store
            && !facts.only_if_cached
            && !facts.no_cache
            && !facts.personal(&overrides);
        let join = if may_join {
            self.shared.flights.wait_for_rebuild(key.as_str())
        } else {
            None
        };
        let pending = Pending {
            svc,
            req,
            miss: Miss {
                shared: self.shared.clone(),
                base: key.clone(),
                key,
                facts,
                overrides,
            },
        };
        match join {
            Some(wait) => {
                Counters::bump(&self.shared.counters.misses);
                ResponseFuture::waiting(wait, pending)
            }
            None => {
                let key = pending.miss.key.clone();
                ResponseFuture::lookup(Box::pin(lookup(self.shared.clone(), key)), pending)
            }
        }
    }
}

/// The readied inner service and the request, held while the cache is
/// consulted.
pub(crate) struct Pending<S, B> {
    pub(crate) svc: S,
    pub(crate) req: Request<B>,
    pub(crate) miss: Miss,
}

/// What a lookup found. Moved once per request, so the size difference
/// between variants costs nothing worth a box.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Found {
    Entry(Entry),
    /// A vary stub: the variant is under a key of its own.
    Vary(Vec<HeaderName>),
    Nothing,
    Failed(StoreError),
}

pub(crate) type LookupFuture = Pin<Box<dyn Future<Output = Found> + Send>>;

impl Found {
    /// A copy for a request that shared this lookup.
    pub(crate) fn share(&self) -> Found {
        match self {
            Found::Entry(entry) => Found::Entry(entry.clone()),
            Found::Vary(names) => Found::Vary(names.clone()),
            Found::Nothing => Found::Nothing,
            Found::Failed(err) => Found::Failed(err.copy_kind()),
        }
    }
}

/// Looks `key` up, sharing one store read among concurrent lookups of it.
pub(crate) async fn lookup(shared: Arc<Shared>, key: CacheKey) -> Found {
    match shared.lookups.start(&key) {
        Reading::First(guard) => {
            let found = read(shared.clone(), key).await;
            guard.share(&found);
            found
        }
        Reading::Follow(rx) => match flight::follow(rx).await {
            Some(found) => found,
            None => read(shared, key).await,
        },
    }
}

async fn read(shared: Arc<Shared>, key: CacheKey) -> Found {
    match with_timeout(shared.store_timeout, shared.store.get(key.as_str())).await {
        Ok(Some(record)) => match Record::decode(&record, key.as_str()) {
            Ok(Record::Entry(entry)) => Found::Entry(entry),
            Ok(Record::Vary(names)) => Found::Vary(names),
            // Written by a newer instance (a rolling deploy): a miss here,
            // but still good for the instances that wrote it.
            Err(err) if err.is_unknown_version() => {
                tracing::debug!(key = key.as_str(), error = %err, "tower-fence: keeping a record of a newer codec; treated as a miss");
                Found::Nothing
            }
            // Corrupt, retired or written for another key: never served.
            Err(err) => {
                Counters::bump(&shared.counters.decode_errors);
                tracing::warn!(key = key.as_str(), error = %err, "tower-fence: deleting a record that does not decode");
                spawn_delete(shared, key);
                Found::Nothing
            }
        },
        Ok(None) => Found::Nothing,
        Err(err) => {
            Counters::bump(&shared.counters.store_errors);
            tracing::warn!(key = key.as_str(), error = %err, "tower-fence: store lookup failed; passing through");
            Found::Failed(err)
        }
    }
}

fn spawn_delete(shared: Arc<Shared>, key: CacheKey) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            let _ = with_timeout(shared.store_timeout, shared.store.delete(key.as_str())).await;
        });
    }
}

/// Runs a store call under the layer's store timeout.
pub(crate) async fn with_timeout<T, F>(timeout: Option<Duration>, call: F) -> Result<T, StoreError>
where
    F: Future<Output = Result<T, StoreError>>,
{
    match timeout {
        None => call.await,
        Some(limit) => tokio::time::timeout(limit, call)
            .await
            .unwrap_or_else(|_| Err(StoreError::timeout())),
    }
}

/// What a looked-up request needs if it turns out to be a miss.
#[derive(Debug)]
pub(crate) struct Miss {
    pub(crate) shared: Arc<Shared>,
    /// The key looked up, led and filled: the URL's, or its variant's.
    pub(crate) key: CacheKey,
    /// The URL's key (which holds the vary stub when responses vary).
    pub(crate) base: CacheKey,
    /// What the request asks of the cache.
    pub(crate) facts: policy::RequestFacts,
    /// The route's settings.
    pub(crate) overrides: policy::Overrides,
}

/// What to do with the inner service's response. Moved once per request.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Outcome {
    /// Pass it through, saying this in `Cache-Status`.
    Pass(Arc<Shared>, CacheStatus),
    /// A write: pass it through, then invalidate what it touched.
    Write {
        shared: Arc<Shared>,
        uri: http::Uri,
        host: Option<String>,
        /// More prefixes the route's rule invalidates.
        also: Vec<String>,
    },
    /// A miss: store the response if it may be stored.
    Fill {
        miss: Miss,
        fwd: Fwd,
        method: Method,
        request_headers: HeaderMap,
        /// The request path (for index sets).
        path: String,
        started: Instant,
    },
}

impl Outcome {
    /// The request goes to the inner service itself; its response is stored
    /// if it may be (without a lease: used when the flight could not help).
    pub(crate) fn fill<B>(miss: Miss, fwd: Fwd, req: &Request<B>) -> Self {
        Outcome::Fill {
            miss,
            fwd,
            method: req.method().clone(),
            request_headers: req.headers().clone(),
            path: req.uri().path().to_owned(),
            started: Instant::now(),
        }
    }
}

/// A response built from an entry. `with_age` adds `Age` (RFC 9111
/// §5.1) for responses served from the cache; `head` leaves the body out;
/// `conditional` holds the request's headers when its validators are to be
/// evaluated: a match gives `304 Not Modified` (RFC 9110 §13.2).
pub(crate) fn entry_response<B: Body>(
    entry: Entry,
    head: bool,
    status: CacheStatus,
    with_age: bool,
    conditional: Option<&HeaderMap>,
) -> Response<FenceBody<B>> {
    let now_ms = unix_ms(SystemTime::now());
    let age = entry.age_secs(now_ms);
    if conditional.is_some_and(|request| validation::not_modified(&entry, request)) {
        let mut response = Response::new(FenceBody::cached(Bytes::new(), None));
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        *response.headers_mut() = validation::not_modified_headers(&entry.headers);
        if with_age {
            response
                .headers_mut()
                .insert(header::AGE, HeaderValue::from(age));
        }
        status.append_to(response.headers_mut());
        return response;
    }
    let body_len = entry.body.len();
    let body = if head {
        FenceBody::cached(Bytes::new(), None)
    } else {
        FenceBody::cached(entry.body, entry.trailers)
    };
    let mut response = Response::new(body);
    *response.status_mut() = entry.status;
    *response.headers_mut() = entry.headers;
    let headers = response.headers_mut();
    if may_have_content_length(entry.status) && !headers.contains_key(header::CONTENT_LENGTH) {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
    }
    if with_age {
        headers.insert(header::AGE, HeaderValue::from(age));
    }
    status.append_to(headers);
    response
}

fn may_have_content_length(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// The request's values for the headers a stored response varies on: all
/// field lines joined by `, `; `None` for an absent header.
pub(crate) fn vary_values(
    names: &[HeaderName],
    request: &HeaderMap,
) -> Vec<(HeaderName, Option<HeaderValue>)> {
    names
        .iter()
        .map(|name| (name.clone(), joined(request, name)))
        .collect()
}

fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let mut rest = values.peekable();
    if rest.peek().is_none() {
        return Some(first.clone());
    }
    let mut out = first.as_bytes().to_vec();
    for value in rest {
        out.extend_from_slice(b", ");
        out.extend_from_slice(value.as_bytes());
    }
    HeaderValue::from_bytes(&out).ok()
}

pub(crate) fn vary_matches(entry: &Entry, request: &HeaderMap) -> bool {
    entry
        .vary
        .iter()
        .all(|(name, stored)| joined(request, name).as_ref() == stored.as_ref())
}

/// Wraps the inner service's response: records it for the store when it may
/// be stored, and says what happened in `Cache-Status`.
pub(crate) fn finish<B: Body>(response: Response<B>, outcome: Outcome) -> Response<FenceBody<B>> {
    let (mut parts, body) = response.into_parts();
    let (status, body) = match outcome {
        Outcome::Pass(shared, status) => {
            invalidate::strip_tags(&shared, &mut parts.headers);
            (status, FenceBody::passthrough(body))
        }
        Outcome::Write { shared, .. } => {
            invalidate::strip_tags(&shared, &mut parts.headers);
            (CacheStatus::bypass("method"), FenceBody::passthrough(body))
        }
        Outcome::Fill {
            miss,
            fwd,
            method,
            request_headers,
            path,
            started,
        } => {
            let shared = miss.shared.clone();
            let tags = invalidate::tags(&shared, &parts.headers);
            invalidate::strip_tags(&shared, &mut parts.headers);
            let mut status = CacheStatus {
                fwd_status: Some(parts.status.as_u16()),
                ..CacheStatus::forward(fwd)
            };
            let body = if method != Method::GET {
                FenceBody::passthrough(body)
            } else if !miss.facts.may_store {
                status.detail = Some("request-no-store");
                FenceBody::passthrough(body)
            } else {
                if miss.overrides.strip_set_cookie {
                    parts.headers.remove(header::SET_COOKIE);
                }
                match policy::storability(
                    &shared.policy,
                    &miss.overrides,
                    parts.status,
                    &parts.headers,
                    &miss.facts,
                    SystemTime::now(),
                ) {
                    Err(reason) => {
                        status.detail = Some(reason);
                        FenceBody::passthrough(body)
                    }
                    Ok(_) if body.size_hint().lower() > shared.max_body_size as u64 => {
                        status.detail = Some("too-large");
                        FenceBody::passthrough(body)
                    }
                    Ok(freshness) => {
                        let names = policy::vary_names(&parts.headers).unwrap_or_default();
                        status.stored = body
                            .size_hint()
                            .upper()
                            .is_some_and(|upper| upper <= shared.max_body_size as u64);
                        let fill = Fill {
                            sets: invalidate::fill_sets(
                                &shared,
                                &path,
                                &tags,
                                &miss.overrides.tags,
                            ),
                            declared_vary: miss.overrides.declared_vary.clone(),
                            shared: miss.shared.clone(),
                            key: miss.key,
                            base: miss.base,
                            status: parts.status,
                            headers: policy::storable_headers(&parts.headers),
                            freshness,
                            vary: vary_values(&names, &request_headers),
                            started,
                        };
                        FenceBody::recording(body, Recorder::new(fill))
                    }
                }
            };
            (status, body)
        }
    };
    status.append_to(&mut parts.headers);
    Response::from_parts(parts, body)
}
