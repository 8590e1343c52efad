//! A purge endpoint an app or a proxy mounts: `PURGE` requests, guarded by
//! a shared secret, that invalidate a path, a prefix or tags, hard or soft.
//!
//! | request | purges |
//! |---|---|
//! | `PURGE /users/42` | the path `/users/42` exactly: every query string and variant, nothing under it |
//! | `PURGE /users` with `Purge-Scope: prefix` | `/users` and every path under it |
//! | `PURGE /` with `Purge-Tag: user-42 users` | the entries tagged `user-42` or `users` (the path is not used) |
//! | any of these with `Purge-Mode: soft` | marks them stale instead ([`Purge::Soft`]) |
//!
//! Every request must carry `Authorization: Bearer <secret>`; without it,
//! or with another secret, the answer is `401` and nothing is purged. The
//! comparison takes the same time whatever the secret sent. Other methods
//! get `405`. The answer is `200` with a line saying how many keys changed,
//! `400` for a request it cannot read, `503` when the store failed (the
//! purge is then queued and retried, and this process serves nothing
//! generated before it meanwhile; see [`Invalidator`]).
//!
//! Mount it where only operators reach it, in front of the cache or beside
//! it: with axum, `Router::new().nest_service("/_purge", purge)` makes
//! `PURGE /_purge/users/42` purge `/users/42` (axum strips the prefix).

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use sha2::{Digest, Sha256};
use tower_service::Service;

use crate::error::{ConfigError, StoreError};
use crate::invalidate::{Invalidator, Purge};

/// The shortest secret [`PurgeService::new`] accepts, in bytes.
pub const MIN_PURGE_SECRET_LEN: usize = 16;

/// The header that widens a path purge to a prefix (`Purge-Scope: prefix`).
pub const PURGE_SCOPE: &str = "purge-scope";
/// The header that names tags to purge (`Purge-Tag: a b`, space or comma
/// separated).
pub const PURGE_TAG: &str = "purge-tag";
/// The header that asks for a soft purge (`Purge-Mode: soft`).
pub const PURGE_MODE: &str = "purge-mode";

/// A tower `Service` that answers `PURGE` requests; see the
/// [module docs](self). Cheap to clone.
///
/// ```
/// use tower_fence::purge::PurgeService;
/// use tower_fence::FenceLayer;
///
/// let layer = FenceLayer::memory();
/// let purge = PurgeService::new(layer.invalidator(), "a-long-random-shared-secret")?;
/// // With axum: Router::new().nest_service("/_purge", purge)
/// # let _ = purge;
/// # Ok::<(), tower_fence::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct PurgeService {
    invalidator: Invalidator,
    secret: [u8; 32],
}

impl fmt::Debug for PurgeService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PurgeService")
            .field("invalidator", &self.invalidator)
            .finish_non_exhaustive()
    }
}

impl PurgeService {
    /// A purge endpoint on `invalidator` that answers requests carrying
    /// `Authorization: Bearer <secret>`. The secret must be at least
    /// [`MIN_PURGE_SECRET_LEN`] bytes of visible ASCII (it travels in a
    /// header); only its SHA-256 digest is kept.
    pub fn new(invalidator: Invalidator, secret: impl AsRef<str>) -> Result<Self, ConfigError> {
        let secret = secret.as_ref();
        if secret.len() < MIN_PURGE_SECRET_LEN {
            return Err(ConfigError::new(format!(
                "the purge secret must be at least {MIN_PURGE_SECRET_LEN} bytes"
            )));
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::new(
                "the purge secret must be visible ASCII, without spaces",
            ));
        }
        Ok(PurgeService {
            invalidator,
            secret: Sha256::digest(secret.as_bytes()).into(),
        })
    }

    /// Answers one request.
    async fn answer(
        &self,
        method: Method,
        path: String,
        headers: HeaderMap,
    ) -> Response<Full<Bytes>> {
        if method.as_str() != "PURGE" {
            let mut response = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only PURGE is answered here\n".into(),
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("PURGE"));
            return response;
        }
        if !self.authorized(&headers) {
            let mut response = text(
                StatusCode::UNAUTHORIZED,
                "a valid purge secret is needed\n".into(),
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tower-fence purge\""),
            );
            return response;
        }
        let request = match PurgeRequest::read(&path, &headers) {
            Ok(request) => request,
            Err(reason) => return text(StatusCode::BAD_REQUEST, format!("{reason}\n")),
        };
        let invalidator = match request.purge {
            Purge::Soft => self.invalidator.soft(),
            _ => self.invalidator.clone(),
        };
        let mut changed = 0;
        let mut failure: Option<StoreError> = None;
        let mut outcome = |result: Result<u64, StoreError>| match result {
            Ok(n) => changed += n,
            Err(err) => failure = Some(err),
        };
        match &request.scope {
            Scope::Path(path) => outcome(invalidator.invalidate_path(path).await),
            Scope::Prefix(path) => outcome(invalidator.invalidate_prefix(path).await),
            Scope::Tags(tags) => {
                for tag in tags {
                    outcome(invalidator.invalidate_tag(tag).await);
                }
            }
        }
        let mode = if request.purge == Purge::Soft {
            "soft"
        } else {
            "hard"
        };
        match failure {
            None => text(
                StatusCode::OK,
                format!(
                    "purged {} ({mode}): {changed} keys changed\n",
                    request.scope
                ),
            ),
            Some(err) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "purge of {} ({mode}) failed: {err}; it is queued for retry\n",
                    request.scope
                ),
            ),
        }
    }

    /// Whether `headers` carry `Authorization: Bearer <the secret>`,
    /// compared in constant time (digests of equal length).
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return false;
        };
        let Some(given) = value
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .or_else(|| value.as_bytes().strip_prefix(b"bearer "))
        else {
            return false;
        };
        let given: [u8; 32] = Sha256::digest(given).into();
        given
            .iter()
            .zip(&self.secret)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// What one `PURGE` asks.
#[derive(Debug, PartialEq, Eq)]
struct PurgeRequest {
    scope: Scope,
    purge: Purge,
}

#[derive(Debug, PartialEq, Eq)]
enum Scope {
    Path(String),
    Prefix(String),
    Tags(Vec<String>),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Path(path) => write!(f, "path {path}"),
            Scope::Prefix(path) => write!(f, "prefix {path}"),
            Scope::Tags(tags) => write!(f, "tags {}", tags.join(" ")),
        }
    }
}

impl PurgeRequest {
    fn read(path: &str, headers: &HeaderMap) -> Result<Self, String> {
        let purge = match one_header(headers, PURGE_MODE)? {
            None => Purge::Hard,
            Some(mode) if mode.eq_ignore_ascii_case("hard") => Purge::Hard,
            Some(mode) if mode.eq_ignore_ascii_case("soft") => Purge::Soft,
            Some(mode) => return Err(format!("Purge-Mode {mode:?} is neither hard nor soft")),
        };
        if let Some(tags) = one_header(headers, PURGE_TAG)? {
            let tags: Vec<String> = tags
                .split([' ', ','])
                .filter(|tag| !tag.is_empty())
                .map(str::to_owned)
                .collect();
            if tags.is_empty() {
                return Err("Purge-Tag names no tag".into());
            }
            if one_header(headers, PURGE_SCOPE)?.is_some() {
                return Err("Purge-Scope and Purge-Tag together".into());
            }
            return Ok(PurgeRequest {
                scope: Scope::Tags(tags),
                purge,
            });
        }
        if !path.starts_with('/') {
            return Err(format!("the path {path:?} is not absolute"));
        }
        let scope = match one_header(headers, PURGE_SCOPE)? {
            None => Scope::Path(path.to_owned()),
            Some(scope) if scope.eq_ignore_ascii_case("path") => Scope::Path(path.to_owned()),
            Some(scope) if scope.eq_ignore_ascii_case("prefix") => Scope::Prefix(path.to_owned()),
            Some(scope) => return Err(format!("Purge-Scope {scope:?} is neither path nor prefix")),
        };
        Ok(PurgeRequest { scope, purge })
    }
}

/// The one value of header `name`, trimmed; an error when it is repeated
/// or not text.
fn one_header<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, String> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(format!("{name} given twice"));
    }
    value
        .to_str()
        .map(|v| Some(v.trim()))
        .map_err(|_| format!("{name} is not text"))
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

impl<B> Service<Request<B>> for PurgeService {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The body is not read: a purge says all it asks in its head.
        let (parts, _body) = request.into_parts();
        let this = self.clone();
        let path = parts.uri.path().to_owned();
        Box::pin(async move { Ok(this.answer(parts.method, path, parts.headers).await) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn requests_are_read_strictly() {
        let read = |path: &str, h: &[(&str, &str)]| PurgeRequest::read(path, &headers(h));
        assert_eq!(
            read("/a", &[]),
            Ok(PurgeRequest {
                scope: Scope::Path("/a".into()),
                purge: Purge::Hard
            })
        );
        assert_eq!(
            read("/a", &[("purge-scope", "Prefix"), ("purge-mode", "soft")]),
            Ok(PurgeRequest {
                scope: Scope::Prefix("/a".into()),
                purge: Purge::Soft
            })
        );
        assert_eq!(
            read("/", &[("purge-tag", "a, b  c")]),
            Ok(PurgeRequest {
                scope: Scope::Tags(vec!["a".into(), "b".into(), "c".into()]),
                purge: Purge::Hard
            })
        );
        for bad in [
            read("/a", &[("purge-scope", "everything")]),
            read("/a", &[("purge-mode", "gentle")]),
            read("/a", &[("purge-tag", " , ")]),
            read("/a", &[("purge-tag", "a"), ("purge-scope", "prefix")]),
            read("/a", &[("purge-scope", "path"), ("purge-scope", "prefix")]),
            read("*", &[]),
        ] {
            assert!(bad.is_err(), "{bad:?}");
        }
    }

    #[test]
    fn secrets_are_checked() {
        let invalidator = crate::FenceLayer::memory().invalidator();
        assert!(PurgeService::new(invalidator.clone(), "short").is_err());
        assert!(PurgeService::new(invalidator.clone(), "has a space in it!!").is_err());
        let service = PurgeService::new(invalidator, "0123456789abcdef").unwrap();
        assert!(service.authorized(&headers(&[("authorization", "Bearer 0123456789abcdef")])));
        for wrong in [
            vec![],
            vec![("authorization", "Bearer 0123456789abcdeF")],
            vec![("authorization", "Bearer 0123456789abcde")],
            vec![("authorization", "Basic 0123456789abcdef")],
            vec![("authorization", "0123456789abcdef")],
            vec![
                ("authorization", "Bearer 0123456789abcdef"),
                ("authorization", "Bearer 0123456789abcdef"),
            ],
        ] {
            assert!(!service.authorized(&headers(&wrong)), "{wrong:?}");
        }
    }
}
