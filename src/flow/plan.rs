//! Classifying a request: passed through, a write that invalidates, or a
//! lookup under a key.

use std::sync::Arc;

use http::header;
use http::request::Parts;
use http::Uri;

use crate::flow::Keyed;
use crate::grpc;

use crate::key::{self, CacheKey};
use crate::policy::rules::Matched;
use crate::policy::{self, Overrides, RequestFacts, RequestPlan};
use crate::shared::Shared;
use crate::status::CacheStatus;

/// What to do with a request.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Plan {
    /// Send it to the inner service untouched, saying so in `Cache-Status`.
    Pass(CacheStatus),
    /// A write: send it on, then invalidate what it touched.
    Write(Write),
    /// Look it up.
    Lookup(Keyed),
    /// A gRPC call a rule caches: read its request message first, then
    /// [`plan_grpc`] it.
    ReadGrpc,
}

/// A write's request, kept to work out what its success invalidates.
#[derive(Debug)]
pub(crate) struct Write {
    pub(crate) uri: Uri,
    pub(crate) host: Option<String>,
    /// More prefixes the route's rule invalidates.
    pub(crate) also: Vec<String>,
    /// Tags the route's rule invalidates.
    pub(crate) tags: Vec<String>,
    /// A gRPC call: it succeeded unless its head says it failed.
    pub(crate) grpc: bool,
}

/// Plans the request whose head is `parts`.
pub(crate) fn plan(shared: &Arc<Shared>, parts: &Parts) -> Plan {
    if grpc::is_grpc_family(&parts.headers) {
        return plan_grpc_head(shared, parts);
    }
    let matched = matched_rule(shared, parts);
    let route_bypass = matched.as_ref().and_then(|m| m.rule.bypass_reason(parts));
    let request_plan = match route_bypass {
        Some(detail) => RequestPlan::Bypass(detail),
        // A GET that declares a body is keyed without it, and its body may
        // never come: never share its answer nor let it lead a flight.
        None if is_read(&parts.method) && declares_body(parts) => {
            RequestPlan::Bypass("request-body")
        }
        // Authority-form (`GET example.com:80`) or any target without an
        // absolute path: its key would be outside every path a write or a
        // prefix invalidation selects.
        None if !parts.uri.path().starts_with('/') => RequestPlan::Bypass("target"),
        None => policy::plan_request(
            &parts.method,
            &parts.headers,
            shared.client_cache_control,
            &shared.policy,
        ),
    };
    let facts = match request_plan {
        RequestPlan::Bypass(detail) => {
            shared.bump(|c| &c.bypasses);
            let write = shared.invalidation.is_write(&parts.method, &parts.headers)
                && !matched
                    .as_ref()
                    .is_some_and(|m| m.rule.invalidates_nothing());
            if !write {
                return Plan::Pass(CacheStatus::bypass(detail));
            }
            return Plan::Write(Write {
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
                tags: matched
                    .as_ref()
                    .map(|m| m.invalidated_tags())
                    .unwrap_or_default(),
                grpc: false,
            });
        }
        RequestPlan::Lookup(facts) => facts,
    };
    let (key, overrides) = key_and_overrides(shared, parts, matched.as_ref(), &[]);
    Plan::Lookup(keyed(shared, key, facts, overrides))
}

/// The key a request is cached under, with its route's key parts: what
/// [`FenceLayer::cache_key`](crate::FenceLayer::cache_key) and
/// [`Invalidator::invalidate_request`](crate::Invalidator::invalidate_request)
/// use. `None` when the request is never cached by key (its route is off,
/// or a key part it needs is missing).
pub(crate) fn key_of(shared: &Shared, parts: &Parts) -> Option<CacheKey> {
    let matched = matched_rule(shared, parts);
    if matched
        .as_ref()
        .is_some_and(|m| m.rule.bypass_reason(parts).is_some())
    {
        return None;
    }
    Some(key_and_overrides(shared, parts, matched.as_ref(), &[]).0)
}

/// The key `request` is cached under, with its route's key parts (see
/// [`key_of`]); a request its rule never caches by key gets the key it
/// would have without the rule.
pub(crate) fn key_of_request<B>(shared: &Shared, request: &http::Request<B>) -> CacheKey {
    let mut parts = http::Request::new(()).into_parts().0;
    parts.method = request.method().clone();
    parts.uri = request.uri().clone();
    parts.headers = request.headers().clone();
    parts.extensions = request.extensions().clone();
    key_of(shared, &parts)
        .unwrap_or_else(|| key::derive_from(&shared.key, &parts.method, &parts.uri, &parts.headers))
}

/// A gRPC (or gRPC-Web) call, before its body is read: passed, unless a
/// [`Rule::grpc`](crate::policy::rules::Rule::grpc) names its method, to
/// cache it (gRPC only) or to invalidate on its success.
fn plan_grpc_head(shared: &Arc<Shared>, parts: &Parts) -> Plan {
    let pass = |detail| {
        shared.bump(|c| &c.bypasses);
        Plan::Pass(CacheStatus::bypass(detail))
    };
    let Some(matched) = matched_rule(shared, parts) else {
        return pass("method");
    };
    if matched.rule.is_grpc_write() {
        shared.bump(|c| &c.bypasses);
        return Plan::Write(Write {
            uri: parts.uri.clone(),
            host: None,
            also: matched.invalidations(),
            tags: matched.invalidated_tags(),
            grpc: true,
        });
    }
    if grpc::is_grpc_web(&parts.headers) {
        return pass("grpc-web");
    }
    if let Some(detail) = matched.rule.bypass_reason(parts) {
        return pass(detail);
    }
    Plan::ReadGrpc
}

/// Plans a gRPC call a rule caches, once its request `message` was read
/// (see [`grpc::read_request`]): a lookup under a key that holds the
/// message's hash, or a pass.
pub(crate) fn plan_grpc(shared: &Arc<Shared>, parts: &Parts, message: &[u8]) -> Plan {
    let matched =
        matched_rule(shared, parts).filter(|m| m.rule.is_grpc() && !m.rule.is_grpc_write());
    let Some(matched) = matched else {
        shared.bump(|c| &c.bypasses);
        return Plan::Pass(CacheStatus::bypass("method"));
    };
    // Read as a `GET` would be: its credentials and directives.
    let facts = match policy::plan_request(
        &http::Method::GET,
        &parts.headers,
        shared.client_cache_control,
        &shared.policy,
    ) {
        RequestPlan::Lookup(facts) => facts,
        RequestPlan::Bypass(detail) => {
            shared.bump(|c| &c.bypasses);
            return Plan::Pass(CacheStatus::bypass(detail));
        }
    };
    let extra = [grpc::key_part(message, &parts.headers)];
    let (key, overrides) = key_and_overrides(shared, parts, Some(&matched), &extra);
    Plan::Lookup(keyed(shared, key, facts, overrides))
}

/// The pattern of the route rule `parts` matches: the `route` of its
/// metrics and span (low-cardinality, never the raw path).
pub(crate) fn route_of(shared: &Shared, parts: &Parts) -> Option<Arc<str>> {
    if shared.rules.is_empty() {
        return None;
    }
    let grpc = grpc::is_grpc_family(&parts.headers);
    let matched = shared
        .rules
        .find_kind(&parts.method, parts.uri.path(), grpc)?;
    Some(Arc::from(matched.rule.pattern()))
}

fn matched_rule<'a>(shared: &'a Shared, parts: &Parts) -> Option<Matched<'a>> {
    if shared.rules.is_empty() {
        return None;
    }
    let grpc = grpc::is_grpc_family(&parts.headers);
    let mut matched = shared
        .rules
        .find_kind(&parts.method, parts.uri.path(), grpc)?;
    matched.add_header_params(&parts.headers);
    Some(matched)
}

fn key_and_overrides(
    shared: &Shared,
    parts: &Parts,
    matched: Option<&Matched<'_>>,
    more: &[Vec<u8>],
) -> (CacheKey, Overrides) {
    let Some(m) = matched else {
        let key = key::derive_with(&shared.key, &parts.method, &parts.uri, &parts.headers, more);
        return (key, Overrides::default());
    };
    let rule = m.rule;
    let mut extra = rule.key_parts(parts);
    extra.extend_from_slice(more);
    let key = key::derive_with(
        &shared.key,
        &parts.method,
        &parts.uri,
        &parts.headers,
        &extra,
    );
    let overrides = Overrides {
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

/// A request looked up under `key` (its URL's key, until a vary stub
/// sends it to a variant), arriving in this write epoch.
fn keyed(shared: &Arc<Shared>, key: CacheKey, facts: RequestFacts, overrides: Overrides) -> Keyed {
    Keyed {
        shared: shared.clone(),
        base: key.clone(),
        key,
        facts,
        overrides,
        epoch: shared.epoch(),
    }
}

fn is_read(method: &http::Method) -> bool {
    method == http::Method::GET || method == http::Method::HEAD
}

/// Whether the request declares a body (`Content-Length` above zero, or
/// `Transfer-Encoding`).
fn declares_body(parts: &Parts) -> bool {
    if parts.headers.contains_key(header::TRANSFER_ENCODING) {
        return true;
    }
    parts
        .headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .any(|v| v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) != Some(0))
}
