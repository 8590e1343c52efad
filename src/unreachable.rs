//! The mark an inner service puts on a response it made up because the
//! origin could not be reached.

/// Put into the extensions of a `5xx` response that the inner service made
/// itself because the origin could not be reached (connection refused or
/// reset, connect or read timeout): a proxy's `502`/`504`. The cache then
/// serves the stale entry it still holds for the request instead, as RFC
/// 9111 §4.2.4 allows a disconnected cache to (and as Varnish and nginx
/// configured for it do), unless the entry forbids it (`must-revalidate`,
/// `proxy-revalidate`, `s-maxage`, `no-cache`). How long after expiry such
/// an entry is still held is [`keep`](crate::FenceLayerBuilder::keep) (or
/// a longer grace or stale-if-error window). Without a stale entry the
/// response goes out as it is; it is never stored.
///
/// ```
/// use http::{Response, StatusCode};
/// use tower_fence::OriginUnreachable;
///
/// let mut response = Response::new("502 Bad Gateway: the upstream could not be reached\n");
/// *response.status_mut() = StatusCode::BAD_GATEWAY;
/// response.extensions_mut().insert(OriginUnreachable);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OriginUnreachable;
