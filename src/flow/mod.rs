//! The decisions of a request's way through the cache. Each function here
//! returns what to do next; none names the response future's state, which
//! only the response future holds and advances.
//!
//! - [`plan`]: classify the request (pass, write, look up), derive its key;
//! - [`lookup`]: one store read per key at a time;
//! - [`hit`]: what a lookup found means (serve, refresh, miss);
//! - [`wait`]: what a wait for another request's rebuild came to;
//! - [`lead`]: the rebuild a flight's leader runs in a task of its own
//!   (acquire the lease, re-check, call the origin, settle);
//! - [`origin`]: the request a rebuild sends and what its response allows;
//! - [`settle`]: storing an entry, fenced by the lease that allowed it;
//! - [`refresh`]: background refreshes (XFetch, grace).

use std::sync::Arc;

use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::key::CacheKey;
use crate::policy::{Overrides, RequestFacts};
use crate::shared::Shared;

pub(crate) mod hit;
pub(crate) mod lead;
pub(crate) mod lookup;
pub(crate) mod origin;
pub(crate) mod plan;
pub(crate) mod refresh;
pub(crate) mod settle;
pub(crate) mod wait;

/// A request the cache may answer: its key and what it asks.
#[derive(Debug)]
pub(crate) struct Keyed {
    pub(crate) shared: Arc<Shared>,
    /// The key looked up, led and filled: the URL's, or its variant's.
    pub(crate) key: CacheKey,
    /// The URL's key (which holds the vary stub when responses vary).
    pub(crate) base: CacheKey,
    /// What the request asks of the cache.
    pub(crate) facts: RequestFacts,
    /// The route's settings.
    pub(crate) overrides: Overrides,
    /// The write epoch when the request arrived: it joins no flight or
    /// read that started before.
    pub(crate) epoch: u64,
}

impl Keyed {
    /// Whether the request may share a rebuild with others (lead or wait
    /// in the key's flight): it may store, and its answer is not personal.
    pub(crate) fn may_share(&self) -> bool {
        self.facts.may_store && !self.facts.personal(&self.overrides)
    }
}

/// The inner service as a rebuild needs it: it, its future and its error
/// move to a task of their own.
pub(crate) trait Inner<B, RB>:
    Service<Request<B>, Response = Response<RB>, Future: Send + 'static, Error: Send + 'static>
    + Send
    + 'static
{
}

impl<S, B, RB> Inner<B, RB> for S
where
    S: Service<Request<B>, Response = Response<RB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
}

/// A response body a rebuild task may read and forward.
pub(crate) trait SendBody: Body<Data: Send, Error: Send> + Send + 'static {}

impl<T> SendBody for T
where
    T: Body + Send + 'static,
    T::Data: Send,
    T::Error: Send,
{
}

/// A fresh random token for a lease or a permit: 32 lower-case hex digits
/// (by table: `format!` was about 5 % of a miss's instructions).
pub(crate) fn new_token() -> String {
    let mut token = String::with_capacity(32);
    crate::key::push_hex(&mut token, &fastrand::u128(..).to_be_bytes());
    token
}

#[cfg(test)]
mod tests {
    use super::new_token;

    #[test]
    fn tokens_are_32_hex_digits_and_differ() {
        let a = new_token();
        let b = new_token();
        for token in [&a, &b] {
            assert_eq!(token.len(), 32, "{token}");
            assert!(token
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        }
        assert_ne!(a, b);
        // The same digits `format!` gives, most significant first.
        fastrand::seed(7);
        let n = fastrand::u128(..);
        fastrand::seed(7);
        assert_eq!(new_token(), format!("{n:032x}"));
    }
}
