//! Route rules: per-route cache settings, chosen by method and path.
//!
//! A [`Rule`] names the requests it applies to (a path pattern in axum's
//! syntax or a path prefix, optionally narrowed to some methods) and how they
//! are cached: their TTL and stale windows, what else goes into their key,
//! their tags and what a write on them invalidates. [`Rules`] is an ordered
//! list; the first rule that matches a request wins, and a request no rule
//! matches gets the layer's settings.
//!
//! The module is pure: no tower, no IO. A bad pattern or setting never
//! panics: the rule keeps the mistake and it is reported as a
//! [`ConfigError`] when the layer is built.

// The layer reads these settings once the rules are wired into it; until
// then only the tests do.

use std::any::TypeId;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName};
use http::request::Parts;
use http::{Extensions, Method};
use sha2::{Digest, Sha256};

use crate::error::ConfigError;

/// A route rule: which requests it applies to, and how they are cached.
///
/// A rule starts from [`Rule::path`] (an axum-style pattern) or
/// [`Rule::prefix`], and every setter it does not call keeps the layer's
/// setting. Rules go into [`Rules`], where the first match wins.
///
/// ```
/// use std::time::Duration;
/// use http::Method;
/// use tower_fence::policy::rules::{Rule, Rules};
///
/// let rules: Rules = [
///     // Never cache the login flow.
///     Rule::prefix("/auth").off(),
///     // A user for five minutes, tagged per user; a write on one user
///     // also invalidates the list.
///     Rule::path("/users/{id}")
///         .ttl(Duration::from_secs(300))
///         .tags(["users", "user-{id}"])
///         .invalidate(["/users"]),
///     // Static files for a day, whatever the origin says.
///     Rule::path("/static/{*file}")
///         .methods([Method::GET])
///         .override_ttl(Duration::from_secs(86_400)),
///     // Dashboards apart per tenant cookie, served stale for 30 s while
///     // they refresh.
///     Rule::prefix("/dashboard")
///         .key_cookie("tenant")
///         .grace(Duration::from_secs(30)),
/// ]
/// .into_iter()
/// .collect();
/// assert_eq!(rules.len(), 4);
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct Rule {
    /// The pattern or prefix as given, for messages.
    source: String,
    /// `None` when the pattern is invalid (`error` says why).
    matcher: Option<Matcher>,
    methods: Option<Vec<Method>>,
    ttl: Option<Duration>,
    override_ttl: Option<Duration>,
    grace: Option<Duration>,
    stale_if_error: Option<Duration>,
    vary: Vec<HeaderName>,
    key_headers: Vec<HeaderName>,
    key_cookies: Vec<String>,
    key_extensions: Vec<ExtensionKey>,
    tags: Vec<String>,
    invalidate: Vec<String>,
    invalidate_tags: Vec<String>,
    /// Placeholders filled from request headers (gRPC metadata): name,
    /// header.
    header_params: Vec<(String, HeaderName)>,
    /// A gRPC method rule ([`Rule::grpc`]).
    grpc: bool,
    no_invalidation: bool,
    off: bool,
    authorization_keyed: bool,
    share_cookies: bool,
    strip_set_cookie: bool,
    /// The first mistake met while building the rule.
    error: Option<String>,
}

impl Rule {
    /// A rule for the paths `pattern` matches, in axum's syntax:
    ///
    /// - a literal segment matches itself exactly (percent-encoding is
    ///   compared as given; `{{` and `}}` stand for literal braces);
    /// - `{name}` matches exactly one non-empty segment and captures it;
    /// - `{*name}` (or a bare `*`), only as the last segment, matches the
    ///   rest of the path, zero or more segments: `/files/{*rest}` matches
    ///   `/files`, `/files/` and `/files/a/b`, like a [prefix](Rule::prefix);
    /// - a trailing slash is significant: `/users` does not match `/users/`.
    ///
    /// An invalid pattern (not starting with `/`, an unbalanced brace, an
    /// empty or repeated name, a catch-all that is not last, a parameter
    /// that is not a whole segment) never panics: the layer's `build()`
    /// reports it, and until then the rule matches nothing.
    pub fn path(pattern: &str) -> Rule {
        let mut rule = Rule::empty(pattern);
        match parse_pattern(pattern) {
            Ok(matcher) => rule.matcher = Some(matcher),
            Err(message) => rule.fail(message),
        }
        rule
    }

    /// A rule for everything at or under a path prefix: `/api` matches
    /// `/api`, `/api/` and `/api/x`, never `/apix`. A trailing slash is
    /// ignored, and `/` matches every path. The prefix is literal: use
    /// [`Rule::path`] to capture parameters.
    pub fn prefix(prefix: &str) -> Rule {
        let mut rule = Rule::empty(prefix);
        if !prefix.starts_with('/') {
            rule.fail("a prefix must start with `/`");
        } else if prefix.contains(['{', '}']) {
            rule.fail(
                "a prefix is literal and may not hold `{` or `}`; use Rule::path for parameters",
            );
        } else if prefix.contains(['?', '#']) {
            rule.fail("a prefix matches the path only and may not hold `?` or `#`");
        } else {
            let trimmed = prefix.trim_end_matches('/');
            let segments = trimmed
                .split('/')
                .skip(1)
                .map(|s| Segment::Literal(s.to_owned()))
                .collect();
            rule.matcher = Some(Matcher {
                segments,
                tail: Some(Tail::Anonymous),
            });
        }
        rule
    }

    /// A rule for one gRPC method, by its path `/package.Service/Method`
    /// (exactly; no parameters). Only calls such a rule names are ever
    /// cached or invalidate: every other gRPC call, and every gRPC-Web
    /// call, goes to the inner service untouched and is not a write.
    ///
    /// - Without [`invalidate`](Rule::invalidate) or
    ///   [`invalidate_tags`](Rule::invalidate_tags), the method's calls are
    ///   cached, for an idempotent **unary** method: the key holds a
    ///   SHA-256 of the request message as it came (read up to
    ///   [`grpc_max_request`](crate::FenceLayerBuilder::grpc_max_request)
    ///   bytes, then handed on intact) and its encoding metadata, never
    ///   `grpc-timeout`, `te` or other per-call metadata unless named with
    ///   [`key_header`](Rule::key_header). A response is stored only when
    ///   it is one message with `grpc-status: 0` (in the trailers, or in a
    ///   trailers-only response); every other answer goes to its own caller
    ///   only, never to the calls waiting for it. Trailers are stored and
    ///   replayed.
    /// - With them, the method is a write: when a call's response head is
    ///   not a failure (`200`, no failing `grpc-status` in a trailers-only
    ///   response), what they name is invalidated. Its calls are never
    ///   cached.
    ///
    /// Streaming calls are never cached, even when a rule names them: a
    /// request that is not one message, or not ended within
    /// [`grpc_read_timeout`](crate::FenceLayerBuilder::grpc_read_timeout),
    /// passes through, and a response that is not one message is not stored.
    /// Reading the request body needs a body type the layer can hand on
    /// again: tonic's (feature `tonic`), or `http_body_util::Full<Bytes>`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_fence::policy::rules::{Rule, Rules};
    ///
    /// let rules: Rules = [
    ///     Rule::grpc("/users.Users/GetUser")
    ///         .ttl(Duration::from_secs(60))
    ///         .header_param("id", "x-user-id")
    ///         .tags(["user-{id}"]),
    ///     // Its success invalidates the user's tag, and every cached
    ///     // `ListUsers` call.
    ///     Rule::grpc("/users.Users/UpdateUser")
    ///         .header_param("id", "x-user-id")
    ///         .invalidate_tags(["user-{id}"])
    ///         .invalidate(["/users.Users/ListUsers"]),
    /// ]
    /// .into_iter()
    /// .collect();
    /// assert_eq!(rules.len(), 2);
    /// ```
    pub fn grpc(method_path: &str) -> Rule {
        let mut rule = Rule::empty(method_path);
        let valid = method_path
            .strip_prefix('/')
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(service, method)| {
                !service.is_empty()
                    && !method.is_empty()
                    && !method.contains('/')
                    && method_path
                        .chars()
                        .all(|c| c.is_ascii_graphic() && !matches!(c, '{' | '}' | '?' | '#'))
            });
        if valid {
            rule.matcher = parse_pattern(method_path).ok();
        }
        if rule.matcher.is_none() {
            rule.fail("a gRPC method path is `/package.Service/Method`");
        }
        rule.methods = Some(vec![Method::POST]);
        rule.grpc = true;
        rule
    }

    fn empty(source: &str) -> Rule {
        Rule {
            source: source.to_owned(),
            matcher: None,
            methods: None,
            ttl: None,
            override_ttl: None,
            grace: None,
            stale_if_error: None,
            vary: Vec::new(),
            key_headers: Vec::new(),
            key_cookies: Vec::new(),
            key_extensions: Vec::new(),
            tags: Vec::new(),
            invalidate: Vec::new(),
            invalidate_tags: Vec::new(),
            header_params: Vec::new(),
            grpc: false,
            no_invalidation: false,
            off: false,
            authorization_keyed: false,
            share_cookies: false,
            strip_set_cookie: false,
            error: None,
        }
    }

    /// Keeps the first mistake; `validate` reports it.
    fn fail(&mut self, message: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(message.into());
        }
    }

    /// The methods the rule applies to, replacing any given before; `GET`
    /// includes `HEAD` (they share entries). Writes are matched too: give
    /// their methods for [`invalidate`](Rule::invalidate) and
    /// [`no_invalidation`](Rule::no_invalidation) to apply to them. An
    /// empty list is a configuration error. Defaults to any method.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Rule {
        self.methods = Some(methods.into_iter().collect());
        self
    }

    /// How long a response stays fresh when it states no freshness of its
    /// own, instead of the layer's default TTL. Defaults to the layer's.
    pub fn ttl(mut self, ttl: Duration) -> Rule {
        self.ttl = Some(ttl);
        self
    }

    /// How long a response stays fresh whatever it states: `max-age`,
    /// `s-maxage` and `Expires` are ignored, while `no-store` and `private`
    /// are still honoured. Takes precedence over [`ttl`](Rule::ttl); zero
    /// is a configuration error (use [`off`](Rule::off)). Defaults to none:
    /// the response's own freshness counts.
    pub fn override_ttl(mut self, ttl: Duration) -> Rule {
        self.override_ttl = Some(ttl);
        self
    }

    /// How long after it turns stale an entry may still be served while one
    /// request refreshes it (stale-while-revalidate), when the response
    /// states no window of its own. Defaults to the layer's grace.
    pub fn grace(mut self, window: Duration) -> Rule {
        self.grace = Some(window);
        self
    }

    /// How long after it turns stale an entry may be served when the origin
    /// fails, when the response states no `stale-if-error` of its own.
    /// Defaults to the layer's.
    pub fn stale_if_error(mut self, window: Duration) -> Rule {
        self.stale_if_error = Some(window);
        self
    }

    /// Request headers the route's responses vary on, declared up front:
    /// their values become part of the key, as if every response carried
    /// them in `Vary`. Adds to the headers declared before; an invalid name
    /// or `*` is a configuration error. Defaults to none.
    pub fn vary(mut self, headers: impl IntoIterator<Item = impl AsRef<str>>) -> Rule {
        for name in headers {
            let name = name.as_ref();
            if name.trim() == "*" {
                self.fail("vary `*` can not be declared; use off() for a route never cached");
                continue;
            }
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(name) if !self.vary.contains(&name) => self.vary.push(name),
                Ok(_) => {}
                Err(_) => self.fail(format!("vary header {name:?} is not a header name")),
            }
        }
        self
    }

    /// Adds a request header whose values become part of the key, such as
    /// a tenant id or a language. An invalid name is a configuration error.
    /// Defaults to none (beyond the layer's key headers).
    pub fn key_header(mut self, name: &str) -> Rule {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(name) if !self.key_headers.contains(&name) => self.key_headers.push(name),
            Ok(_) => {}
            Err(_) => self.fail(format!("key header {name:?} is not a header name")),
        }
        self
    }

    /// Adds a cookie whose value becomes part of the key (from every
    /// `Cookie` header of the request; names are case-sensitive). A name
    /// that is not a cookie name (RFC 6265 token) is a configuration error.
    /// Defaults to none.
    ///
    /// A route keyed by a cookie declares that its responses depend on no
    /// other cookie (nor on the layer's
    /// [credential headers](crate::FenceLayerBuilder::credential_header)):
    /// responses to requests with cookies are stored and shared among the
    /// requests with the same values of the keyed cookies, as with
    /// [`share_cookies`](Rule::share_cookies). So does a route that keys by
    /// (or declares it [varies](Rule::vary) on) the whole `Cookie` header.
    pub fn key_cookie(mut self, name: &str) -> Rule {
        if !is_token(name) {
            self.fail(format!("key cookie {name:?} is not a cookie name"));
        } else if !self.key_cookies.iter().any(|c| c == name) {
            self.key_cookies.push(name.to_owned());
        }
        self
    }

    /// Adds a request extension of type `T` (a tenant id, say) whose value
    /// becomes part of the key, through a hash that is stable across
    /// processes and builds (SHA-256 over `T`'s `Hash` input).
    ///
    /// The extension must be inserted by a layer that runs *before* the
    /// cache (outside it). A request without it is not cached at all
    /// (`Cache-Status` `detail=extension-missing`): caching it under a
    /// shared key could serve one tenant's response to another.
    /// Defaults to none.
    pub fn key_extension<T: Clone + Send + Sync + Hash + 'static>(mut self) -> Rule {
        let type_id = TypeId::of::<T>();
        if !self.key_extensions.iter().any(|e| e.type_id == type_id) {
            self.key_extensions.push(ExtensionKey {
                type_id,
                type_name: std::any::type_name::<T>(),
                digest: extension_digest::<T>,
            });
        }
        self
    }

    /// Adds tags every entry of the route joins, for invalidation by tag.
    /// A tag may hold `{name}` placeholders filled from the matched path's
    /// parameters (`user-{id}` for `/users/{id}`); `{{` and `}}` stand for
    /// literal braces. A placeholder the pattern does not capture, an empty
    /// tag or one holding whitespace is a configuration error. Defaults to
    /// none (beyond the response's tag header).
    pub fn tags(mut self, tags: impl IntoIterator<Item = impl Into<String>>) -> Rule {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }

    /// Adds path prefixes a write on this route invalidates, besides its
    /// own path: `/users` for `/users/{id}`, or `/teams/{team}/members`
    /// with placeholders as in [`tags`](Rule::tags). Each must start with
    /// `/`. Defaults to none.
    pub fn invalidate(mut self, paths: impl IntoIterator<Item = impl Into<String>>) -> Rule {
        self.invalidate.extend(paths.into_iter().map(Into::into));
        self
    }

    /// Adds tags a write on this route invalidates, with placeholders as in
    /// [`tags`](Rule::tags) (from the path, or from request headers named
    /// by [`header_param`](Rule::header_param)); one that cannot be filled
    /// is left out. Defaults to none.
    pub fn invalidate_tags(mut self, tags: impl IntoIterator<Item = impl Into<String>>) -> Rule {
        self.invalidate_tags
            .extend(tags.into_iter().map(Into::into));
        self
    }

    /// A placeholder `{name}` for [`tags`](Rule::tags),
    /// [`invalidate`](Rule::invalidate) and
    /// [`invalidate_tags`](Rule::invalidate_tags), filled from the request
    /// header (gRPC metadata) `header`: its one value, if it is visible
    /// ASCII without `/`, `*`, `?`, `[`, `]`, `{`, `}` or `\`. A cached
    /// request without such a value is not cached
    /// (`detail=param-missing`): its entry could not be found by its tag.
    /// A name the path captures too, or an invalid header name, is a
    /// configuration error. Defaults to none.
    pub fn header_param(mut self, name: &str, header: &str) -> Rule {
        match HeaderName::from_bytes(header.as_bytes()) {
            Ok(header) if !name.is_empty() => {
                if self.header_params.iter().any(|(n, _)| n == name) {
                    self.fail(format!("header parameter {name:?} given twice"));
                } else {
                    self.header_params.push((name.to_owned(), header));
                }
            }
            _ => self.fail(format!(
                "header parameter {name:?}: {header:?} is not a header name"
            )),
        }
        self
    }

    /// Writes on this route invalidate nothing, not even their own path.
    /// Giving [`invalidate`](Rule::invalidate) too is a configuration
    /// error. Defaults to off: writes invalidate.
    pub fn no_invalidation(mut self) -> Rule {
        self.no_invalidation = true;
        self
    }

    /// The route is never cached: its requests go to the inner service
    /// untouched (`Cache-Status` `detail=rule-off`). Defaults to off.
    pub fn off(mut self) -> Rule {
        self.off = true;
        self
    }

    /// With `true`, a response to a request with `Authorization` may be
    /// stored even when it does not say it may be shared: the key then holds
    /// a SHA-256 of the credential, so each credential has its own entries.
    /// An outer layer must still check the credential: a revoked one keeps
    /// its entries until they expire. With `false`, such a response is
    /// stored only when it allows sharing (`public`, `s-maxage`,
    /// `must-revalidate`, RFC 9111 §3.5). Defaults to `false`.
    pub fn authorization(mut self, keyed: bool) -> Rule {
        self.authorization_keyed = keyed;
        self
    }

    /// Responses to requests with cookies are shared: only for routes whose
    /// responses do not depend on the cookie (nor on the layer's
    /// [credential headers](crate::FenceLayerBuilder::credential_header)).
    /// A response to a request with `Cookie` is then stored, and served to
    /// every request, as if the request had none; without this (nor a
    /// [cookie key](Rule::key_cookie)) it is stored only when it says it
    /// may be shared (`public` or `s-maxage`), since it may be that user's
    /// page. Defaults to off.
    pub fn share_cookies(mut self) -> Rule {
        self.share_cookies = true;
        self
    }

    /// A response's `Set-Cookie` headers are removed so that it can be
    /// stored; the client gets the response without them too. Defaults to
    /// off: a response with `Set-Cookie` is not stored.
    pub fn strip_set_cookie(mut self) -> Rule {
        self.strip_set_cookie = true;
        self
    }

    /// The pattern or prefix the rule was made from.
    pub(crate) fn pattern(&self) -> &str {
        &self.source
    }

    /// The methods the rule is limited to; `None` for any.
    #[cfg_attr(not(test), allow(dead_code))] // read by tests
    pub(crate) fn methods_setting(&self) -> Option<&[Method]> {
        self.methods.as_deref()
    }

    /// Freshness when the response states none.
    pub(crate) fn ttl_setting(&self) -> Option<Duration> {
        self.ttl
    }

    /// Freshness whatever the response states.
    pub(crate) fn override_ttl_setting(&self) -> Option<Duration> {
        self.override_ttl
    }

    /// Stale-while-revalidate window when the response states none.
    pub(crate) fn grace_setting(&self) -> Option<Duration> {
        self.grace
    }

    /// Stale-if-error window when the response states none.
    pub(crate) fn stale_if_error_setting(&self) -> Option<Duration> {
        self.stale_if_error
    }

    /// Request headers declared to vary up front.
    pub(crate) fn vary_headers(&self) -> &[HeaderName] {
        &self.vary
    }

    /// Request headers that are key parts.
    #[cfg_attr(not(test), allow(dead_code))] // read by tests
    pub(crate) fn key_headers(&self) -> &[HeaderName] {
        &self.key_headers
    }

    /// Cookies that are key parts.
    #[cfg_attr(not(test), allow(dead_code))] // read by tests
    pub(crate) fn key_cookies(&self) -> &[String] {
        &self.key_cookies
    }

    /// Whether some request extension is a key part.
    #[cfg_attr(not(test), allow(dead_code))] // read by tests
    pub(crate) fn has_key_extensions(&self) -> bool {
        !self.key_extensions.is_empty()
    }

    /// Tag templates, unexpanded (see [`Matched::tags`]).
    #[cfg_attr(not(test), allow(dead_code))] // read by tests
    pub(crate) fn tag_templates(&self) -> &[String] {
        &self.tags
    }

    /// Extra invalidation prefixes, unexpanded (see
    /// [`Matched::invalidations`]).
    #[cfg_attr(not(test), allow(dead_code))] // read by tests
    pub(crate) fn invalidate_templates(&self) -> &[String] {
        &self.invalidate
    }

    /// Writes on the route invalidate nothing.
    pub(crate) fn invalidates_nothing(&self) -> bool {
        self.no_invalidation
    }

    /// A gRPC method rule ([`Rule::grpc`]).
    pub(crate) fn is_grpc(&self) -> bool {
        self.grpc
    }

    /// A gRPC method rule whose calls are writes (it invalidates).
    pub(crate) fn is_grpc_write(&self) -> bool {
        self.grpc && (!self.invalidate.is_empty() || !self.invalidate_tags.is_empty())
    }

    /// The route is never cached.
    #[cfg_attr(not(test), allow(dead_code))] // read by tests
    pub(crate) fn is_off(&self) -> bool {
        self.off
    }

    /// Requests with `Authorization` are keyed by their credential.
    pub(crate) fn authorization_keyed(&self) -> bool {
        self.authorization_keyed
    }

    /// Requests with cookies (or credential headers) share responses: the
    /// rule [shares cookies](Rule::share_cookies) or keys by cookie (a
    /// [cookie key](Rule::key_cookie), or the whole `Cookie` header as a
    /// key or declared vary header).
    pub(crate) fn cookies_shared(&self) -> bool {
        self.share_cookies
            || !self.key_cookies.is_empty()
            || self
                .vary
                .iter()
                .chain(&self.key_headers)
                .any(|name| name == header::COOKIE)
    }

    /// `Set-Cookie` is removed from responses so that they can be stored.
    pub(crate) fn strips_set_cookie(&self) -> bool {
        self.strip_set_cookie
    }

    /// Why a request this rule matched must not touch the cache, as a
    /// `Cache-Status` `detail` token; `None` when it may.
    pub(crate) fn bypass_reason(&self, parts: &Parts) -> Option<&'static str> {
        if self.off {
            return Some("rule-off");
        }
        if self
            .key_extensions
            .iter()
            .any(|e| (e.digest)(&parts.extensions).is_none())
        {
            return Some("extension-missing");
        }
        if self
            .header_params
            .iter()
            .any(|(_, header)| header_param_value(&parts.headers, header).is_none())
        {
            return Some("param-missing");
        }
        None
    }

    /// The key material the rule adds for a request: one framed,
    /// self-describing part per declared header, cookie and extension, then
    /// the credential's digest when [`authorization`](Rule::authorization)
    /// is keyed. An absent value and an empty one give different parts.
    /// Credentials (`Authorization`, `Proxy-Authorization`, `Cookie` as
    /// whole headers) are only ever present as SHA-256 digests.
    pub(crate) fn key_parts(&self, parts: &Parts) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut seen: Vec<&HeaderName> = Vec::new();
        for name in self.vary.iter().chain(&self.key_headers) {
            if seen.contains(&name) {
                continue;
            }
            seen.push(name);
            let values: Vec<&[u8]> = parts
                .headers
                .get_all(name)
                .iter()
                .map(|v| v.as_bytes())
                .collect();
            let mut part = part_head(b"header", name.as_str().as_bytes());
            push_count(&mut part, values.len());
            for value in values {
                if is_credential_header(name) {
                    frame(&mut part, &credential_digest(value));
                } else {
                    frame(&mut part, value);
                }
            }
            out.push(part);
        }
        for cookie in &self.key_cookies {
            let values = cookie_values(&parts.headers, cookie);
            let mut part = part_head(b"cookie", cookie.as_bytes());
            push_count(&mut part, values.len());
            for value in values {
                frame(&mut part, value);
            }
            out.push(part);
        }
        for extension in &self.key_extensions {
            let mut part = part_head(b"extension", b"");
            match (extension.digest)(&parts.extensions) {
                Some(digest) => {
                    part.push(1);
                    part.extend_from_slice(&digest);
                }
                None => part.push(0),
            }
            out.push(part);
        }
        if self.authorization_keyed {
            let values: Vec<_> = parts
                .headers
                .get_all(header::AUTHORIZATION)
                .iter()
                .collect();
            let mut part = part_head(b"authorization", b"");
            push_count(&mut part, values.len());
            for value in values {
                frame(&mut part, &credential_digest(value.as_bytes()));
            }
            out.push(part);
        }
        out
    }

    /// Reports the rule's configuration mistakes; the layer's `build()`
    /// calls it.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let fail = |message: String| {
            Err(ConfigError::new(format!(
                "rule {:?}: {message}",
                self.source
            )))
        };
        if let Some(message) = &self.error {
            return fail(message.clone());
        }
        let Some(matcher) = &self.matcher else {
            return fail("invalid pattern".to_owned());
        };
        if self.methods.as_ref().is_some_and(Vec::is_empty) {
            return fail("methods() was given no method".to_owned());
        }
        if self.override_ttl.is_some_and(|ttl| ttl.is_zero()) {
            return fail(
                "override_ttl must be longer than zero; use off() to never cache".to_owned(),
            );
        }
        if self.no_invalidation && !self.invalidate.is_empty() {
            return fail("no_invalidation() and invalidate() contradict each other".to_owned());
        }
        let mut names = matcher.param_names();
        for (name, _) in &self.header_params {
            if names.contains(&name.as_str()) {
                return fail(format!(
                    "header parameter {name:?} is captured by the path too"
                ));
            }
            names.push(name);
        }
        for tag in &self.invalidate_tags {
            if let Err(e) = render(tag, |name| names.contains(&name).then_some("")) {
                return fail(format!("invalidated tag {tag:?}: {e}"));
            }
            if tag.is_empty() || tag.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return fail(format!(
                    "invalidated tag {tag:?} is empty or holds whitespace"
                ));
            }
        }
        let lookup = |name: &str| names.contains(&name).then_some("");
        for tag in &self.tags {
            if let Err(e) = render(tag, lookup) {
                return fail(format!("tag {tag:?}: {e}"));
            }
            if tag.is_empty() || tag.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return fail(format!("tag {tag:?} is empty or holds whitespace"));
            }
        }
        for path in &self.invalidate {
            if let Err(e) = render(path, lookup) {
                return fail(format!("invalidated path {path:?}: {e}"));
            }
            if !path.starts_with('/') {
                return fail(format!("invalidated path {path:?} does not start with `/`"));
            }
            if path.contains(['?', '#']) || path.chars().any(char::is_control) {
                return fail(format!(
                    "invalidated path {path:?} holds `?`, `#` or a control character"
                ));
            }
        }
        Ok(())
    }

    /// Whether the rule applies to `method`.
    fn applies_to(&self, method: &Method) -> bool {
        match &self.methods {
            None => true,
            Some(methods) => {
                methods.contains(method)
                    || (method == Method::HEAD && methods.contains(&Method::GET))
            }
        }
    }
}

/// An ordered list of rules; the first that matches a request wins.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    /// Whether a rule gives entries tags.
    pub(crate) fn any_tags(&self) -> bool {
        self.rules.iter().any(|rule| !rule.tags.is_empty())
    }

    /// An empty list: every request gets the layer's settings.
    pub fn new() -> Self {
        Rules::default()
    }

    /// Adds a rule after the ones already there (so it loses to them).
    pub fn push(&mut self, rule: Rule) {
        self.rules.push(rule);
    }

    /// How many rules the list holds.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether the list holds no rule.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule that applies to `method` and `path` (the request's
    /// path, without the query), and the parameters it captured.
    #[cfg_attr(not(test), allow(dead_code))] // read by tests
    pub(crate) fn find(&self, method: &Method, path: &str) -> Option<Matched<'_>> {
        self.find_kind(method, path, false)
    }

    /// [`find`](Rules::find) among the rules of one kind: gRPC method rules
    /// ([`Rule::grpc`]) for gRPC calls, the others for everything else.
    pub(crate) fn find_kind(&self, method: &Method, path: &str, grpc: bool) -> Option<Matched<'_>> {
        self.rules.iter().find_map(|rule| {
            if rule.grpc != grpc || !rule.applies_to(method) {
                return None;
            }
            let params = rule.matcher.as_ref()?.matches(path)?;
            Some(Matched { rule, params })
        })
    }

    /// Says at `build()` (a `tracing` info event) which gRPC methods are
    /// cached and which invalidate, and that streaming calls pass through
    /// even when named: the layer cannot tell a method's kind from its
    /// rule, only from each call.
    pub(crate) fn announce_grpc(&self) {
        let cached: Vec<&str> = self
            .rules
            .iter()
            .filter(|r| r.grpc && !r.is_grpc_write())
            .map(|r| r.source.as_str())
            .collect();
        let writes: Vec<&str> = self
            .rules
            .iter()
            .filter(|r| r.is_grpc_write())
            .map(|r| r.source.as_str())
            .collect();
        if cached.is_empty() && writes.is_empty() {
            return;
        }
        tracing::info!(
            ?cached,
            ?writes,
            "tower-fence: gRPC rules: only unary calls of the cached methods are stored \
             (one request message, one response message, grpc-status 0); server-streaming, \
             client-streaming and bidi calls pass through even when a rule names them"
        );
    }

    /// Reports the first rule's configuration mistake.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.rules.iter().try_for_each(Rule::validate)
    }
}

impl FromIterator<Rule> for Rules {
    fn from_iter<I: IntoIterator<Item = Rule>>(iter: I) -> Self {
        Rules {
            rules: iter.into_iter().collect(),
        }
    }
}

impl Extend<Rule> for Rules {
    fn extend<I: IntoIterator<Item = Rule>>(&mut self, iter: I) {
        self.rules.extend(iter);
    }
}

/// The rule a request matched, and the path parameters it captured (values
/// as they appear in the path, percent-encoding kept).
#[derive(Debug, Clone)]
pub(crate) struct Matched<'a> {
    pub(crate) rule: &'a Rule,
    pub(crate) params: Vec<(String, String)>,
}

impl Matched<'_> {
    /// The value captured for `name`.
    #[cfg_attr(not(test), allow(dead_code))] // read by tests
    pub(crate) fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Adds the values of the rule's [header parameters](Rule::header_param)
    /// found in `headers` to the captured parameters.
    pub(crate) fn add_header_params(&mut self, headers: &HeaderMap) {
        for (name, header) in &self.rule.header_params {
            if let Some(value) = header_param_value(headers, header) {
                self.params.push((name.clone(), value.to_owned()));
            }
        }
    }

    /// The tags a write on the route invalidates, placeholders filled; one
    /// that cannot be filled is left out.
    pub(crate) fn invalidated_tags(&self) -> Vec<String> {
        self.rule
            .invalidate_tags
            .iter()
            .filter_map(|t| expand(t, &self.params))
            .collect()
    }

    /// The rule's tags with their placeholders filled; a tag that cannot be
    /// filled is left out.
    pub(crate) fn tags(&self) -> Vec<String> {
        self.rule
            .tags
            .iter()
            .filter_map(|t| expand(t, &self.params))
            .collect()
    }

    /// The extra prefixes a write invalidates, placeholders filled; one
    /// that cannot be filled is left out. Empty with `no_invalidation`.
    pub(crate) fn invalidations(&self) -> Vec<String> {
        if self.rule.no_invalidation {
            return Vec::new();
        }
        self.rule
            .invalidate
            .iter()
            .filter_map(|p| expand(p, &self.params))
            .collect()
    }
}

/// The one value of `header` usable as a parameter: visible ASCII, not
/// empty, without characters that a path prefix or a tag pattern would
/// read as more than themselves.
fn header_param_value<'h>(headers: &'h HeaderMap, header: &HeaderName) -> Option<&'h str> {
    let mut values = headers.get_all(header).iter();
    let value = values.next()?.to_str().ok()?;
    let usable = values.next().is_none()
        && !value.is_empty()
        && value.chars().all(|c| {
            c.is_ascii_graphic() && !matches!(c, '/' | '*' | '?' | '[' | ']' | '{' | '}' | '\\')
        });
    usable.then_some(value)
}

/// Fills `{name}` placeholders in a tag or path template from captured
/// parameters (`{*name}` is accepted for a catch-all; `{{` and `}}` are
/// literal braces). `None` when a placeholder has no captured value or the
/// template is malformed, rather than a wrong tag or path.
pub(crate) fn expand(template: &str, params: &[(String, String)]) -> Option<String> {
    render(template, |name| {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    })
    .ok()
}

/// Why a template could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplateError {
    Syntax(&'static str),
    Unknown(String),
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateError::Syntax(message) => f.write_str(message),
            TemplateError::Unknown(name) => {
                write!(
                    f,
                    "placeholder {{{name}}} is not a parameter of the pattern"
                )
            }
        }
    }
}

fn render<'v>(
    template: &str,
    lookup: impl Fn(&str) -> Option<&'v str>,
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if rest[i..].starts_with('}') {
            rest = after.strip_prefix('}').ok_or(TemplateError::Syntax(
                "unbalanced `}` (write `}}` for a brace)",
            ))?;
            out.push('}');
            continue;
        }
        if let Some(r) = after.strip_prefix('{') {
            out.push('{');
            rest = r;
            continue;
        }
        let close = after.find('}').ok_or(TemplateError::Syntax(
            "unclosed `{` (write `{{` for a brace)",
        ))?;
        let name = &after[..close];
        if name.contains('{') {
            return Err(TemplateError::Syntax("`{` inside a placeholder"));
        }
        let name = name.strip_prefix('*').unwrap_or(name);
        if name.is_empty() {
            return Err(TemplateError::Syntax("empty placeholder"));
        }
        let value = lookup(name).ok_or_else(|| TemplateError::Unknown(name.to_owned()))?;
        out.push_str(value);
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A parsed path pattern: segments, then maybe a catch-all.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Matcher {
    segments: Vec<Segment>,
    tail: Option<Tail>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tail {
    /// `*`, or a prefix rule: matches the rest without capturing it.
    Anonymous,
    /// `{*name}`.
    Named(String),
}

impl Matcher {
    /// The captured parameters when `path` matches.
    fn matches(&self, path: &str) -> Option<Vec<(String, String)>> {
        let mut rest = path.strip_prefix('/')?;
        // No segment left to match (as opposed to one empty segment left).
        let mut exhausted = false;
        let mut params = Vec::new();
        for segment in &self.segments {
            if exhausted {
                return None;
            }
            let (head, next) = match rest.find('/') {
                Some(i) => (&rest[..i], Some(&rest[i + 1..])),
                None => (rest, None),
            };
            match segment {
                Segment::Literal(literal) if head == literal => {}
                Segment::Literal(_) => return None,
                Segment::Param(_) if head.is_empty() => return None,
                Segment::Param(name) => params.push((name.clone(), head.to_owned())),
            }
            match next {
                Some(next) => rest = next,
                None => exhausted = true,
            }
        }
        match &self.tail {
            None if exhausted => Some(params),
            None => None,
            Some(Tail::Anonymous) => Some(params),
            Some(Tail::Named(name)) => {
                let value = if exhausted { "" } else { rest };
                params.push((name.clone(), value.to_owned()));
                Some(params)
            }
        }
    }

    fn param_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .segments
            .iter()
            .filter_map(|s| match s {
                Segment::Param(name) => Some(name.as_str()),
                Segment::Literal(_) => None,
            })
            .collect();
        if let Some(Tail::Named(name)) = &self.tail {
            names.push(name);
        }
        names
    }
}

/// What one pattern segment is.
enum Piece {
    Literal(String),
    Param(String),
    CatchAll(Option<String>),
}

fn parse_pattern(pattern: &str) -> Result<Matcher, String> {
    let Some(rest) = pattern.strip_prefix('/') else {
        return Err("a pattern must start with `/`".to_owned());
    };
    if pattern.contains(['?', '#']) {
        return Err("a pattern matches the path only and may not hold `?` or `#`".to_owned());
    }
    let raw: Vec<&str> = rest.split('/').collect();
    let last = raw.len().saturating_sub(1);
    let mut matcher = Matcher {
        segments: Vec::with_capacity(raw.len()),
        tail: None,
    };
    for (i, segment) in raw.iter().enumerate() {
        match parse_segment(segment)? {
            Piece::Literal(literal) => matcher.segments.push(Segment::Literal(literal)),
            Piece::Param(name) => matcher.segments.push(Segment::Param(name)),
            Piece::CatchAll(_) if i != last => {
                return Err(format!(
                    "the catch-all {segment:?} must be the last segment"
                ));
            }
            Piece::CatchAll(None) => matcher.tail = Some(Tail::Anonymous),
            Piece::CatchAll(Some(name)) => matcher.tail = Some(Tail::Named(name)),
        }
    }
    let names = matcher.param_names();
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            return Err(format!("parameter {{{name}}} appears twice"));
        }
    }
    Ok(matcher)
}

fn parse_segment(segment: &str) -> Result<Piece, String> {
    if segment == "*" {
        return Ok(Piece::CatchAll(None));
    }
    if let Some(inner) = segment
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .filter(|inner| !inner.contains(['{', '}']))
    {
        let (catch_all, name) = match inner.strip_prefix('*') {
            Some(name) => (true, name),
            None => (false, inner),
        };
        if name.is_empty() || name.contains('*') {
            return Err(format!(
                "segment {segment:?}: a parameter needs a name without `*`"
            ));
        }
        let name = name.to_owned();
        return Ok(if catch_all {
            Piece::CatchAll(Some(name))
        } else {
            Piece::Param(name)
        });
    }
    let mut literal = String::with_capacity(segment.len());
    let mut chars = segment.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '{' || c == '}' {
            if chars.peek() != Some(&c) {
                return Err(format!(
                    "segment {segment:?}: unbalanced brace, or a parameter that is not a \
                     whole segment (write `{{{{` and `}}}}` for literal braces)"
                ));
            }
            chars.next();
        }
        literal.push(c);
    }
    Ok(Piece::Literal(literal))
}

/// A request extension that is a key part.
#[derive(Clone)]
struct ExtensionKey {
    type_id: TypeId,
    type_name: &'static str,
    /// The extension's stable digest; `None` when the request lacks it.
    digest: fn(&Extensions) -> Option<[u8; 16]>,
}

impl fmt::Debug for ExtensionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ExtensionKey")
            .field(&self.type_name)
            .finish()
    }
}

fn extension_digest<T: Hash + Send + Sync + 'static>(extensions: &Extensions) -> Option<[u8; 16]> {
    let value = extensions.get::<T>()?;
    let mut hasher = StableHasher::new();
    value.hash(&mut hasher);
    Some(hasher.digest())
}

/// A [`Hasher`] whose output depends only on what is written to it: SHA-256,
/// integers little-endian and `usize` widened to 64 bits, unlike std's
/// `DefaultHasher`, which may change between Rust releases.
struct StableHasher(Sha256);

impl StableHasher {
    fn new() -> Self {
        let mut sha = Sha256::new();
        sha.update(b"tower-fence extension v1\0");
        StableHasher(sha)
    }

    fn digest(self) -> [u8; 16] {
        let full = self.0.finalize();
        let mut out = [0; 16];
        for (o, b) in out.iter_mut().zip(full.iter()) {
            *o = *b;
        }
        out
    }
}

impl Hasher for StableHasher {
    fn finish(&self) -> u64 {
        let full = self.0.clone().finalize();
        let mut out = [0; 8];
        for (o, b) in out.iter_mut().zip(full.iter()) {
            *o = *b;
        }
        u64::from_le_bytes(out)
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn write_u8(&mut self, i: u8) {
        self.0.update([i]);
    }

    fn write_u16(&mut self, i: u16) {
        self.0.update(i.to_le_bytes());
    }

    fn write_u32(&mut self, i: u32) {
        self.0.update(i.to_le_bytes());
    }

    fn write_u64(&mut self, i: u64) {
        self.0.update(i.to_le_bytes());
    }

    fn write_u128(&mut self, i: u128) {
        self.0.update(i.to_le_bytes());
    }

    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }

    fn write_i8(&mut self, i: i8) {
        self.write_u8(i as u8);
    }

    fn write_i16(&mut self, i: i16) {
        self.write_u16(i as u16);
    }

    fn write_i32(&mut self, i: i32) {
        self.write_u32(i as u32);
    }

    fn write_i64(&mut self, i: i64) {
        self.write_u64(i as u64);
    }

    fn write_i128(&mut self, i: i128) {
        self.write_u128(i as u128);
    }

    fn write_isize(&mut self, i: isize) {
        self.write_u64(i as i64 as u64);
    }
}

/// Headers whose raw values are credentials.
fn is_credential_header(name: &HeaderName) -> bool {
    name == header::AUTHORIZATION || name == header::PROXY_AUTHORIZATION || name == header::COOKIE
}

fn credential_digest(value: &[u8]) -> [u8; 32] {
    let mut sha = Sha256::new();
    sha.update(b"tower-fence credential v1\0");
    sha.update(value);
    let full = sha.finalize();
    let mut out = [0; 32];
    for (o, b) in out.iter_mut().zip(full.iter()) {
        *o = *b;
    }
    out
}

/// The values of cookie `name` in every `Cookie` header, in order
/// (RFC 6265 §5.4: HTTP/2 may split them over several headers). Pairs are
/// `;`-separated, with optional whitespace; a pair without `=` is skipped.
fn cookie_values<'h>(headers: &'h HeaderMap, name: &str) -> Vec<&'h [u8]> {
    let mut out = Vec::new();
    for header in headers.get_all(header::COOKIE) {
        for pair in header.as_bytes().split(|&b| b == b';') {
            let Some(eq) = pair.iter().position(|&b| b == b'=') else {
                continue;
            };
            if trim_ows(&pair[..eq]) == name.as_bytes() {
                out.push(trim_ows(&pair[eq + 1..]));
            }
        }
    }
    out
}

fn trim_ows(bytes: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    bytes.get(start..end).unwrap_or_default()
}

/// RFC 7230 `token`: what a cookie name may be (RFC 6265 §4.1.1).
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn part_head(kind: &[u8], name: &[u8]) -> Vec<u8> {
    let mut part = Vec::with_capacity(kind.len() + name.len() + 40);
    frame(&mut part, kind);
    frame(&mut part, name);
    part
}

fn push_count(part: &mut Vec<u8>, count: usize) {
    part.extend_from_slice(&(count as u64).to_be_bytes());
}

fn frame(part: &mut Vec<u8>, bytes: &[u8]) {
    push_count(part, bytes.len());
    part.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, Request};
    use proptest::prelude::*;

    fn parts(build: http::request::Builder) -> Parts {
        build.body(()).unwrap().into_parts().0
    }

    fn get(uri: &str) -> Parts {
        parts(Request::get(uri))
    }

    fn params(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn one(rule: Rule) -> Rules {
        let mut rules = Rules::new();
        rules.push(rule);
        rules
    }

    /// The params `pattern` captures from `path`, `None` for no match.
    fn capture(pattern: &str, path: &str) -> Option<Vec<(String, String)>> {
        let rules = one(Rule::path(pattern));
        rules.validate().unwrap();
        rules.find(&Method::GET, path).map(|m| m.params)
    }

    #[test]
    fn path_patterns_match_and_capture() {
        type Case = (
            &'static str,
            &'static str,
            Option<&'static [(&'static str, &'static str)]>,
        );
        let cases: &[Case] = &[
            ("/users/{id}", "/users/42", Some(&[("id", "42")])),
            ("/users/{id}", "/users/42/posts", None),
            ("/users/{id}", "/users/", None),
            ("/users/{id}", "/users", None),
            ("/users/{id}", "/users/42/", None),
            ("/users/{id}/", "/users/42/", Some(&[("id", "42")])),
            (
                "/teams/{team}/members/{id}",
                "/teams/a%20b/members/7",
                Some(&[("team", "a%20b"), ("id", "7")]),
            ),
            ("/users", "/users", Some(&[])),
            ("/users", "/users/", None),
            ("/users/", "/users", None),
            ("/users/", "/users/", Some(&[])),
            ("/", "/", Some(&[])),
            ("/", "/a", None),
            ("/", "", None),
            ("/a", "a", None),
            ("/a//b", "/a//b", Some(&[])),
            ("/a//b", "/a/b", None),
            ("/a%2Fb", "/a%2Fb", Some(&[])),
            ("/a%2Fb", "/a/b", None),
            ("/a%2fb", "/a%2Fb", None),
            ("/{{lit}}", "/{lit}", Some(&[])),
            ("/x-*-y", "/x-*-y", Some(&[])),
            ("/files/{*rest}", "/files/a/b/c", Some(&[("rest", "a/b/c")])),
            ("/files/{*rest}", "/files/a/", Some(&[("rest", "a/")])),
            ("/files/{*rest}", "/files/", Some(&[("rest", "")])),
            ("/files/{*rest}", "/files", Some(&[("rest", "")])),
            ("/files/{*rest}", "/filesx", None),
            ("/files/{*rest}", "/file", None),
            ("/files/*", "/files/a/b", Some(&[])),
            ("/files/*", "/files", Some(&[])),
            ("/{*all}", "/", Some(&[("all", "")])),
            ("/{*all}", "/x/y", Some(&[("all", "x/y")])),
            ("/{a}/{*b}", "/x", Some(&[("a", "x"), ("b", "")])),
            ("/{a}/{*b}", "/", None),
        ];
        for (pattern, path, expected) in cases {
            let expected = expected.map(params);
            assert_eq!(capture(pattern, path), expected, "{pattern} on {path:?}");
        }
    }

    #[test]
    fn prefixes_match_at_or_under_a_path_only() {
        let cases: &[(&str, &str, bool)] = &[
            ("/api", "/api", true),
            ("/api", "/api/", true),
            ("/api", "/api/x/y", true),
            ("/api", "/apix", false),
            ("/api", "/ap", false),
            ("/api", "/", false),
            ("/api/", "/api", true),
            ("/api/", "/api/x", true),
            ("/api/", "/apix", false),
            ("/", "/", true),
            ("/", "/anything/at/all", true),
            ("/", "", false),
            ("/a/b", "/a/b/c", true),
            ("/a/b", "/a/bc", false),
        ];
        for (prefix, path, expected) in cases {
            let rules = one(Rule::prefix(prefix));
            rules.validate().unwrap();
            let found = rules.find(&Method::GET, path);
            assert_eq!(found.is_some(), *expected, "{prefix} on {path:?}");
            assert!(found.is_none_or(|m| m.params.is_empty()));
        }
    }

    #[test]
    fn methods_filter_and_get_includes_head() {
        let rules = one(Rule::prefix("/").methods([Method::GET]));
        assert!(rules.find(&Method::GET, "/x").is_some());
        assert!(rules.find(&Method::HEAD, "/x").is_some());
        assert!(rules.find(&Method::POST, "/x").is_none());

        let rules = one(Rule::prefix("/").methods([Method::HEAD]));
        assert!(rules.find(&Method::GET, "/x").is_none());
        assert!(rules.find(&Method::HEAD, "/x").is_some());

        let any = one(Rule::prefix("/"));
        for method in [
            Method::GET,
            Method::POST,
            Method::DELETE,
            Method::from_bytes(b"PURGE").unwrap(),
        ] {
            assert!(any.find(&method, "/x").is_some(), "{method}");
        }

        let replaced = Rule::prefix("/")
            .methods([Method::GET])
            .methods([Method::PUT]);
        assert_eq!(replaced.methods_setting(), Some(&[Method::PUT][..]));
        assert!(one(Rule::prefix("/").methods([])).validate().is_err());
    }

    #[test]
    fn first_match_wins() {
        let rules: Rules = [
            Rule::path("/users/me").off(),
            Rule::path("/users/{id}").ttl(Duration::from_secs(5)),
            Rule::prefix("/users").ttl(Duration::from_secs(9)),
            Rule::prefix("/").methods([Method::POST]).no_invalidation(),
        ]
        .into_iter()
        .collect();
        rules.validate().unwrap();
        assert!(rules.find(&Method::GET, "/users/me").unwrap().rule.is_off());
        let m = rules.find(&Method::GET, "/users/42").unwrap();
        assert_eq!(m.rule.pattern(), "/users/{id}");
        assert_eq!(m.param("id"), Some("42"));
        assert_eq!(m.param("nope"), None);
        let m = rules.find(&Method::GET, "/users/42/posts").unwrap();
        assert_eq!(m.rule.ttl_setting(), Some(Duration::from_secs(9)));
        // The POST-only rule is last: earlier rules (any method) win.
        assert_eq!(
            rules
                .find(&Method::POST, "/users/1")
                .unwrap()
                .rule
                .pattern(),
            "/users/{id}"
        );
        assert!(rules
            .find(&Method::POST, "/other")
            .unwrap()
            .rule
            .invalidates_nothing());
        assert!(rules.find(&Method::GET, "/other").is_none());
        assert!(Rules::new().find(&Method::GET, "/").is_none());
    }

    #[test]
    fn settings_are_kept() {
        let rule = Rule::path("/x")
            .ttl(Duration::from_secs(1))
            .override_ttl(Duration::from_secs(2))
            .grace(Duration::from_secs(3))
            .stale_if_error(Duration::from_secs(4))
            .vary(["Accept-Language", "accept-language", "x-a"])
            .vary(["X-B"])
            .key_header("X-Tenant")
            .key_header("x-tenant")
            .key_cookie("lang")
            .key_cookie("lang")
            .key_extension::<u32>()
            .key_extension::<u32>()
            .authorization(true)
            .strip_set_cookie();
        rule.validate().unwrap();
        assert_eq!(rule.ttl_setting(), Some(Duration::from_secs(1)));
        assert_eq!(rule.override_ttl_setting(), Some(Duration::from_secs(2)));
        assert_eq!(rule.grace_setting(), Some(Duration::from_secs(3)));
        assert_eq!(rule.stale_if_error_setting(), Some(Duration::from_secs(4)));
        let vary: Vec<_> = rule.vary_headers().iter().map(HeaderName::as_str).collect();
        assert_eq!(vary, ["accept-language", "x-a", "x-b"]);
        assert_eq!(rule.key_headers(), [HeaderName::from_static("x-tenant")]);
        assert_eq!(rule.key_cookies(), ["lang"]);
        assert!(rule.has_key_extensions());
        assert_eq!(rule.key_parts(&get("/x")).len(), 4 + 1 + 1 + 1);
        assert!(rule.authorization_keyed());
        assert!(rule.strips_set_cookie());
        assert!(!rule.is_off() && !rule.invalidates_nothing());
        assert!(format!("{rule:?}").contains("u32"));

        let plain = Rule::prefix("/");
        assert_eq!(plain.methods_setting(), None);
        assert_eq!(plain.ttl_setting(), None);
        assert!(!plain.authorization_keyed() && !plain.strips_set_cookie());
        assert!(plain.key_parts(&get("/")).is_empty());
    }

    #[test]
    fn cookies_are_shared_only_when_keyed_or_declared() {
        assert!(!Rule::prefix("/").cookies_shared());
        assert!(!Rule::prefix("/")
            .key_header("x-tenant")
            .vary(["accept-language"])
            .authorization(true)
            .cookies_shared());
        assert!(Rule::prefix("/").share_cookies().cookies_shared());
        assert!(Rule::prefix("/").key_cookie("session").cookies_shared());
        assert!(Rule::prefix("/").key_header("Cookie").cookies_shared());
        assert!(Rule::prefix("/").vary(["cookie"]).cookies_shared());
        // A cookie name that is not valid keys nothing, shares nothing.
        assert!(!Rule::prefix("/").key_cookie("a b").cookies_shared());
    }

    #[test]
    fn expand_fills_placeholders_or_gives_none() {
        let p = params(&[("id", "42"), ("team", "red"), ("rest", "a/b")]);
        let cases: &[(&str, Option<&str>)] = &[
            ("users", Some("users")),
            ("user-{id}", Some("user-42")),
            ("{team}:{id}", Some("red:42")),
            ("/teams/{team}/members", Some("/teams/red/members")),
            ("/files/{rest}", Some("/files/a/b")),
            ("/files/{*rest}", Some("/files/a/b")),
            ("{{id}}", Some("{id}")),
            ("a}}b{{", Some("a}b{")),
            ("{{{id}}}", Some("{42}")),
            ("", Some("")),
            ("user-{missing}", None),
            ("user-{}", None),
            ("user-{*}", None),
            ("user-{id", None),
            ("user-id}", None),
            ("user-{{id}", None),
            ("{a{b}}", None),
        ];
        for (template, expected) in cases {
            assert_eq!(expand(template, &p).as_deref(), *expected, "{template:?}");
        }
        assert_eq!(expand("user-{id}", &[]), None);
    }

    #[test]
    fn matched_tags_and_invalidations_are_expanded() {
        let rules = one(Rule::path("/teams/{team}/members/{id}")
            .tags(["members", "team-{team}"])
            .tags(["member-{id}"])
            .invalidate(["/teams/{team}/members", "/teams/{team}"]));
        rules.validate().unwrap();
        let m = rules.find(&Method::PUT, "/teams/red/members/7").unwrap();
        assert_eq!(
            rules.rules[0].tag_templates(),
            ["members", "team-{team}", "member-{id}"]
        );
        assert_eq!(
            rules.rules[0].invalidate_templates(),
            ["/teams/{team}/members", "/teams/{team}"]
        );
        assert_eq!(m.tags(), ["members", "team-red", "member-7"]);
        assert_eq!(m.invalidations(), ["/teams/red/members", "/teams/red"]);

        // A template the params cannot fill is left out, never half-filled.
        let m = Matched {
            rule: &rules.rules[0],
            params: params(&[("team", "red")]),
        };
        assert_eq!(m.tags(), ["members", "team-red"]);
        assert_eq!(m.invalidations(), ["/teams/red/members", "/teams/red"]);
        let m = Matched {
            rule: &rules.rules[0],
            params: Vec::new(),
        };
        assert_eq!(m.tags(), ["members"]);
        assert!(m.invalidations().is_empty());

        let off = one(Rule::prefix("/x").no_invalidation());
        assert!(off
            .find(&Method::POST, "/x")
            .unwrap()
            .invalidations()
            .is_empty());
    }

    #[test]
    fn cookie_parsing_edge_cases() {
        type Case = (&'static [&'static str], &'static [&'static [u8]]);
        let cases: &[Case] = &[
            (&[], &[]),
            (&["lang=en"], &[b"en"]),
            (&["a=1; lang=fr; b=2"], &[b"fr"]),
            (&["a=1;lang=fr;b=2"], &[b"fr"]),
            (&["  lang  =  de  ; x=y"], &[b"de"]),
            (&["\tlang=de\t"], &[b"de"]),
            (&["lang="], &[b""]),
            (&["lang"], &[]),
            (&["lang;x=1"], &[]),
            (&["xlang=1; langx=2; Lang=3; LANG=4"], &[]),
            (&["lang=a=b"], &[b"a=b"]),
            (&["lang=\"quoted\""], &[b"\"quoted\""]),
            (&["lang=1; lang=2"], &[b"1", b"2"]),
            (&["a=1", "lang=it", "lang=es; b=2"], &[b"it", b"es"]),
            (&[";;; ;lang=pt;;"], &[b"pt"]),
            (&["=lang; lang=nl"], &[b"nl"]),
            (&[""], &[]),
        ];
        for (headers, expected) in cases {
            let mut map = HeaderMap::new();
            for h in *headers {
                map.append(header::COOKIE, HeaderValue::from_str(h).unwrap());
            }
            assert_eq!(cookie_values(&map, "lang"), *expected, "{headers:?}");
        }
        // Non-UTF-8 bytes are compared as bytes, not rejected.
        let mut map = HeaderMap::new();
        map.append(
            header::COOKIE,
            HeaderValue::from_bytes(b"lang=\xff\xfe; a=1").unwrap(),
        );
        assert_eq!(cookie_values(&map, "lang"), [&b"\xff\xfe"[..]]);
    }

    #[test]
    fn cookie_key_parts_tell_absent_empty_and_values_apart() {
        let rule = Rule::prefix("/").key_cookie("lang");
        let key = |cookies: &[&str]| {
            let mut b = Request::get("/");
            for c in cookies {
                b = b.header(header::COOKIE, *c);
            }
            rule.key_parts(&parts(b))
        };
        assert_eq!(key(&["lang=en"]), key(&["a=1; lang=en"]));
        assert_eq!(key(&["lang=en"]), key(&["x=2", "lang=en"]));
        assert_ne!(key(&["lang=en"]), key(&["lang=fr"]));
        assert_ne!(key(&[]), key(&["lang="]));
        assert_eq!(key(&[]), key(&["other=1"]));
        assert_ne!(key(&["lang=a; lang=b"]), key(&["lang=ab"]));
        assert_ne!(key(&["lang=a; lang=b"]), key(&["lang=b; lang=a"]));
    }

    #[test]
    fn header_key_parts_frame_values() {
        let rule = Rule::prefix("/")
            .vary(["accept-language"])
            .key_header("x-tenant");
        let key = |headers: &[(&str, &str)]| {
            let mut b = Request::get("/");
            for (n, v) in headers {
                b = b.header(*n, *v);
            }
            rule.key_parts(&parts(b))
        };
        assert_eq!(key(&[]).len(), 2);
        assert_ne!(key(&[]), key(&[("x-tenant", "")]));
        assert_ne!(key(&[("x-tenant", "a")]), key(&[("x-tenant", "b")]));
        assert_ne!(
            key(&[("x-tenant", "a"), ("x-tenant", "b")]),
            key(&[("x-tenant", "ab")])
        );
        // The same value in one header or the other gives different keys.
        assert_ne!(key(&[("x-tenant", "a")]), key(&[("accept-language", "a")]));
        assert_eq!(
            key(&[("x-tenant", "a"), ("other", "z")]),
            key(&[("x-tenant", "a")])
        );
        // A header both varied on and keyed counts once.
        let both = Rule::prefix("/").vary(["x-a"]).key_header("X-A");
        assert_eq!(both.key_parts(&get("/")).len(), 1);
    }

    #[derive(Debug, Clone, PartialEq, Eq, Hash)]
    struct Tenant(String);

    #[derive(Debug, Clone, PartialEq, Eq, Hash)]
    struct Region(u16);

    #[test]
    fn extension_key_parts_and_missing_extension_bypass() {
        let rule = Rule::prefix("/").key_extension::<Tenant>();
        let with = |tenant: &str| {
            let mut p = get("/");
            p.extensions.insert(Tenant(tenant.to_owned()));
            p
        };
        assert_eq!(rule.key_parts(&with("a")), rule.key_parts(&with("a")));
        assert_ne!(rule.key_parts(&with("a")), rule.key_parts(&with("b")));
        assert_eq!(rule.bypass_reason(&with("a")), None);
        assert_eq!(rule.bypass_reason(&get("/")), Some("extension-missing"));
        assert_ne!(rule.key_parts(&get("/")), rule.key_parts(&with("")));
        // Another type in the extensions does not stand in for it.
        let mut other = get("/");
        other.extensions.insert(Region(1));
        assert_eq!(rule.bypass_reason(&other), Some("extension-missing"));

        let two = Rule::prefix("/")
            .key_extension::<Tenant>()
            .key_extension::<Region>();
        let mut p = with("a");
        p.extensions.insert(Region(1));
        let mut q = with("a");
        q.extensions.insert(Region(2));
        assert_ne!(two.key_parts(&p), two.key_parts(&q));
        assert_eq!(two.bypass_reason(&with("a")), Some("extension-missing"));
        assert_eq!(two.bypass_reason(&p), None);

        assert_eq!(
            Rule::prefix("/").off().bypass_reason(&get("/")),
            Some("rule-off")
        );
        assert_eq!(Rule::prefix("/").bypass_reason(&get("/")), None);
    }

    #[test]
    fn extension_digest_is_stable() {
        // u64's Hash writes its value once: the digest is SHA-256 over the
        // domain and the little-endian bytes, whatever the platform or
        // Rust release.
        let mut extensions = Extensions::new();
        extensions.insert(42u64);
        let mut sha = Sha256::new();
        sha.update(b"tower-fence extension v1\0");
        sha.update(42u64.to_le_bytes());
        let expected = sha.finalize();
        assert_eq!(
            extension_digest::<u64>(&extensions).unwrap()[..],
            expected[..16]
        );

        let mut h = StableHasher::new();
        7usize.hash(&mut h);
        let mut g = StableHasher::new();
        7u64.hash(&mut g);
        assert_eq!(h.finish(), g.finish());
        assert_eq!(h.digest(), g.digest());
    }

    #[test]
    fn authorization_is_keyed_by_a_digest_only() {
        let secret = "Bearer s3cr3t-t0ken-value";
        let keyed = Rule::prefix("/").authorization(true);
        let with = |value: &str| parts(Request::get("/").header(header::AUTHORIZATION, value));
        let a = keyed.key_parts(&with(secret));
        assert_eq!(a, keyed.key_parts(&with(secret)));
        assert_ne!(a, keyed.key_parts(&with("Bearer other")));
        assert_ne!(a, keyed.key_parts(&get("/")));
        let needle = secret.as_bytes();
        let contains_secret = |parts: &[Vec<u8>]| {
            parts.iter().any(|p| {
                p.windows(needle.len()).any(|w| w == needle) || p.windows(6).any(|w| w == b"s3cr3t")
            })
        };
        assert!(!contains_secret(&a));

        // Declaring credential headers as key headers hashes them too.
        let declared = Rule::prefix("/")
            .key_header("authorization")
            .vary(["cookie", "proxy-authorization"]);
        let p = parts(
            Request::get("/")
                .header(header::AUTHORIZATION, secret)
                .header(header::PROXY_AUTHORIZATION, secret)
                .header(header::COOKIE, format!("sid={secret}")),
        );
        assert!(!contains_secret(&declared.key_parts(&p)));
        assert_ne!(declared.key_parts(&p), declared.key_parts(&get("/")));

        // Not keyed: the credential adds nothing to the key.
        let plain = Rule::prefix("/").authorization(false);
        assert!(plain.key_parts(&with(secret)).is_empty());
    }

    #[test]
    fn grpc_rules_name_one_method_and_match_grpc_calls_only() {
        for bad in [
            "pkg.Svc/Get",
            "/pkg.Svc",
            "/pkg.Svc/",
            "//Get",
            "/a/b/c",
            "/a/{m}",
        ] {
            assert!(Rule::grpc(bad).validate().is_err(), "{bad}");
        }
        let rules: Rules = [
            Rule::prefix("/"),
            Rule::grpc("/pkg.Svc/Get"),
            Rule::grpc("/pkg.Svc/Put").invalidate_tags(["t"]),
        ]
        .into_iter()
        .collect();
        assert!(rules.validate().is_ok());
        let grpc = |path| {
            rules
                .find_kind(&Method::POST, path, true)
                .map(|m| m.rule.source.clone())
        };
        assert_eq!(grpc("/pkg.Svc/Get").as_deref(), Some("/pkg.Svc/Get"));
        assert_eq!(
            grpc("/pkg.Svc/Other"),
            None,
            "an HTTP rule names no gRPC method"
        );
        assert_eq!(grpc("/pkg.Svc/Get/x"), None);
        assert!(rules
            .find_kind(&Method::GET, "/pkg.Svc/Get", true)
            .is_none());
        // Plain HTTP requests never match a gRPC rule.
        let http = rules.find(&Method::POST, "/pkg.Svc/Get").unwrap();
        assert_eq!(http.rule.source, "/");
        let writes: Vec<bool> = rules.rules.iter().map(Rule::is_grpc_write).collect();
        assert_eq!(writes, [false, false, true]);
    }

    #[test]
    fn header_params_fill_tags_and_are_checked() {
        let rule = Rule::grpc("/u.U/Get")
            .header_param("id", "x-user-id")
            .tags(["user-{id}"]);
        assert!(rule.validate().is_ok());
        assert!(Rule::grpc("/u.U/Get")
            .tags(["user-{id}"])
            .validate()
            .is_err());
        assert!(Rule::path("/users/{id}")
            .header_param("id", "x-id")
            .validate()
            .is_err());
        assert!(Rule::grpc("/u.U/Get")
            .header_param("id", "not a header")
            .validate()
            .is_err());
        let rules: Rules = [rule].into_iter().collect();
        let mut parts = http::Request::post("/u.U/Get")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let mut matched = rules.find_kind(&Method::POST, "/u.U/Get", true).unwrap();
        assert_eq!(matched.rule.bypass_reason(&parts), Some("param-missing"));
        for bad in ["a*b", "a/b", "", "a b"] {
            parts.headers.insert("x-user-id", bad.parse().unwrap());
            assert_eq!(
                matched.rule.bypass_reason(&parts),
                Some("param-missing"),
                "{bad:?}"
            );
        }
        parts.headers.insert("x-user-id", "42".parse().unwrap());
        assert_eq!(matched.rule.bypass_reason(&parts), None);
        matched.add_header_params(&parts.headers);
        assert_eq!(matched.tags(), ["user-42"]);
    }

    #[test]
    fn invalid_patterns_are_reported_not_panicked() {
        let bad = [
            "",
            "users",
            "*",
            "/users/{id",
            "/users/id}",
            "/users/{}",
            "/users/{*}",
            "/users/{*rest}/more",
            "/users/*/more",
            "/users/x{id}",
            "/users/{id}x",
            "/users/{a}{b}",
            "/users/{{id}",
            "/users/{a*b}",
            "/users/{**a}",
            "/{a}/{a}",
            "/{a}/{*a}",
            "/a?b=1",
            "/a#frag",
        ];
        for pattern in bad {
            let rule = Rule::path(pattern);
            let err = rule.validate().expect_err(pattern);
            assert!(err.to_string().contains(&format!("{pattern:?}")), "{err}");
            let rules = one(rule);
            assert!(rules.validate().is_err());
            for path in ["/", "/users/1", "/users/1/more", pattern] {
                assert!(
                    rules.find(&Method::GET, path).is_none(),
                    "{pattern} on {path}"
                );
            }
        }
        for prefix in ["", "api", "/users/{id}", "/a?b", "/a}"] {
            assert!(Rule::prefix(prefix).validate().is_err(), "{prefix}");
        }
        for good in [
            "/",
            "/*",
            "/{*x}",
            "/a/{b}/c/{*d}",
            "/{{x}}/{y}",
            "/a b",
            "/ünï/{c}",
        ] {
            assert!(Rule::path(good).validate().is_ok(), "{good}");
        }
    }

    #[test]
    fn invalid_settings_are_reported() {
        let bad = [
            Rule::prefix("/").vary(["bad header"]),
            Rule::prefix("/").vary(["*"]),
            Rule::prefix("/").key_header(""),
            Rule::prefix("/").key_header("a:b"),
            Rule::prefix("/").key_cookie(""),
            Rule::prefix("/").key_cookie("a=b"),
            Rule::prefix("/").key_cookie("a b"),
            Rule::prefix("/").key_cookie("a;"),
            Rule::prefix("/").override_ttl(Duration::ZERO),
            Rule::prefix("/").invalidate(["/x"]).no_invalidation(),
            Rule::prefix("/").tags(["user-{id}"]),
            Rule::path("/users/{id}").tags(["user-{uid}"]),
            Rule::path("/users/{id}").tags([""]),
            Rule::path("/users/{id}").tags(["a b"]),
            Rule::path("/users/{id}").tags(["user-{id"]),
            Rule::path("/users/{*rest}").tags(["x-{}"]),
            Rule::path("/users/{id}").invalidate(["users"]),
            Rule::path("/users/{id}").invalidate(["/teams/{team}"]),
            Rule::path("/users/{id}").invalidate(["/x?y"]),
            Rule::path("/users/*").tags(["{*}"]),
        ];
        for rule in &bad {
            assert!(rule.validate().is_err(), "{rule:?}");
        }
        let good = Rule::path("/teams/{team}/files/{*path}")
            .tags(["team-{team}", "file-{path}", "{{literal}}"])
            .invalidate(["/teams/{team}", "/files/{*path}"])
            .override_ttl(Duration::from_secs(1))
            .key_cookie("__Host-sid");
        good.validate().unwrap();
    }

    #[test]
    fn rules_are_send_sync_and_clone() {
        fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
        assert_send_sync::<Rule>();
        assert_send_sync::<Rules>();
        let mut rules = Rules::new();
        assert!(rules.is_empty());
        rules.extend([Rule::prefix("/a"), Rule::prefix("/b")]);
        let copy = rules.clone();
        assert_eq!(copy.len(), 2);
        assert!(copy.find(&Method::GET, "/b/c").is_some());
    }

    proptest! {
        #[test]
        fn matching_never_panics(pattern in "[/a-c{}*?#%]{0,16}", path in "[/a-c{}*%]{0,16}") {
            let rules: Rules = [Rule::path(&pattern), Rule::prefix(&pattern)].into_iter().collect();
            let _ = rules.validate();
            for method in [Method::GET, Method::HEAD, Method::POST] {
                if let Some(m) = rules.find(&method, &path) {
                    let _ = m.tags();
                    let _ = m.invalidations();
                }
            }
        }

        #[test]
        fn arbitrary_unicode_never_panics(pattern in "\\PC{0,24}", path in "\\PC{0,24}") {
            let rule = Rule::path(&pattern).tags([pattern.clone()]).invalidate([pattern.clone()]);
            let _ = rule.validate();
            let rules = one(rule);
            if let Some(m) = rules.find(&Method::GET, &path) {
                let _ = m.tags();
            }
            let _ = expand(&pattern, &params(&[("a", &path)]));
        }

        #[test]
        fn a_literal_pattern_matches_exactly_itself(a in "/[a-z0-9%/]{0,12}", b in "/[a-z0-9%/]{0,12}") {
            let rules = one(Rule::path(&a));
            prop_assert!(rules.validate().is_ok());
            prop_assert_eq!(rules.find(&Method::GET, &b).is_some(), a == b);
        }

        #[test]
        fn a_prefix_matches_its_subtree_only(a in "/[ab/]{0,8}", b in "/[ab/]{0,8}") {
            let rules = one(Rule::prefix(&a));
            prop_assert!(rules.validate().is_ok());
            let stem = a.trim_end_matches('/');
            let expected = stem.is_empty() || b == stem || b.starts_with(&format!("{stem}/"));
            prop_assert_eq!(rules.find(&Method::GET, &b).is_some(), expected);
        }

        #[test]
        fn a_param_captures_any_nonempty_segment(seg in "[^/]{1,12}") {
            let path = format!("/u/{seg}/x");
            let m = capture("/u/{id}/x", &path);
            prop_assert_eq!(m, Some(params(&[("id", &seg)])));
        }

        #[test]
        fn cookie_parsing_never_panics(value in proptest::collection::vec(any::<u8>(), 0..48)) {
            if let Ok(value) = HeaderValue::from_bytes(&value) {
                let mut map = HeaderMap::new();
                map.append(header::COOKIE, value);
                let _ = cookie_values(&map, "a");
                let mut p = get("/");
                p.headers = map;
                let _ = Rule::prefix("/").key_cookie("a").vary(["cookie"]).key_parts(&p);
            }
        }
    }
}
