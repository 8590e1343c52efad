//! Turning a recorded response into a stored entry.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::entry::{concat, Entry};
use crate::key::CacheKey;
use crate::layer::Shared;
use crate::policy::Freshness;

/// Everything needed to store a response once its body has been read.
#[derive(Debug)]
pub(crate) struct Fill {
    pub(crate) shared: Arc<Shared>,
    pub(crate) key: CacheKey,
    /// The URL's key (differs from `key` for a variant).
    pub(crate) base: CacheKey,
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) freshness: Freshness,
    pub(crate) vary: Vec<(HeaderName, Option<HeaderValue>)>,
    pub(crate) started: Instant,
    /// Sets the entry joins (tags, prefix indexes).
    pub(crate) sets: Vec<String>,
    /// Headers the route declared to vary on (part of the key already).
    pub(crate) declared_vary: Vec<HeaderName>,
}

/// Collects a response body, as the client reads it, up to the size cap.
#[derive(Debug)]
pub(crate) struct Recorder {
    fill: Fill,
    chunks: Vec<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
}

impl Recorder {
    pub(crate) fn new(fill: Fill) -> Self {
        Recorder {
            fill,
            chunks: Vec::new(),
            len: 0,
            trailers: None,
        }
    }

    /// Adds a data frame; `false` when the body outgrew the cap (the
    /// recording must then be dropped).
    pub(crate) fn push_data(&mut self, data: &Bytes) -> bool {
        self.len = self.len.saturating_add(data.len());
        if self.len > self.fill.shared.max_body_size {
            return false;
        }
        if !data.is_empty() {
            self.chunks.push(data.clone());
        }
        true
    }

    pub(crate) fn push_trailers(&mut self, trailers: &HeaderMap) {
        match &mut self.trailers {
            Some(existing) => existing.extend(trailers.clone()),
            None => self.trailers = Some(trailers.clone()),
        }
    }

    /// The body ended cleanly: store the entry (in the background).
    pub(crate) fn finish(self) {
        let body = concat(self.chunks, self.len);
        let fill = self.fill;
        let entry = Entry::new(
            fill.status,
            fill.headers,
            body,
            self.trailers,
            &fill.freshness,
            fill.started,
            fill.vary,
        );
        store_entry(
            fill.shared,
            fill.base,
            fill.key,
            entry,
            fill.sets,
            fill.declared_vary,
        );
    }
}

/// Writes `entry` to the store in a background task, bounded by the store
/// timeout. Without a Tokio runtime nothing is stored (and nothing panics).
pub(crate) fn store_entry(
    shared: Arc<Shared>,
    base: CacheKey,
    key: CacheKey,
    entry: Entry,
    sets: Vec<String>,
    declared_vary: Vec<HeaderName>,
) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        tracing::debug!("no tokio runtime; response not stored");
        return;
    };
    let mut write = Box::pin(async move {
        if crate::rebuild::fill(&shared, &base, &key, &entry, None, &sets, &declared_vary).await {
            shared.hit_for_miss.invalidate(base.as_str());
            shared.hit_for_miss.invalidate(key.as_str());
        }
    });
    // A store that completes at once (the memory store) is done before the
    // client sees the end of the body, so the next request finds the entry;
    // a remote one finishes in the background.
    let mut cx = Context::from_waker(Waker::noop());
    if write.as_mut().poll(&mut cx).is_pending() {
        handle.spawn(write);
    }
}
