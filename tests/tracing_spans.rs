//! Each request gets a `tower_fence` span whose `cache` field says what the
//! cache did, and the work the layer spawns for it (a rebuild, a background
//! refresh, a write's invalidation) runs inside that span, so that an
//! OpenTelemetry bridge in the app sees one trace.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, Layer, ServiceExt};
use tower_fence::store::{KeyPattern, MemoryStore, Store, StoreFuture};
use tower_fence::{Clock, FenceLayer};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Instrument, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// Every span: its name, its parent, and the `cache` field once recorded.
#[derive(Default)]
struct Spans {
    spans: HashMap<u64, (&'static str, Option<u64>, Option<String>)>,
}

type Shared = Arc<Mutex<Spans>>;

struct Recording(Shared);

struct CacheField(Option<String>);

impl Visit for CacheField {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "cache" {
            self.0 = Some(value.to_owned());
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "cache" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Recording {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let parent = if let Some(parent) = attrs.parent() {
            Some(parent.into_u64())
        } else if attrs.is_contextual() {
            ctx.current_span().id().map(|id| id.into_u64())
        } else {
            None
        };
        let name = attrs.metadata().name();
        self.0
            .lock()
            .unwrap()
            .spans
            .insert(id.into_u64(), (name, parent, None));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: Context<'_, S>) {
        let mut field = CacheField(None);
        values.record(&mut field);
        if let Some(cache) = field.0 {
            if let Some(span) = self.0.lock().unwrap().spans.get_mut(&id.into_u64()) {
                span.2 = Some(cache);
            }
        }
    }
}

impl Spans {
    /// The names from the span `id` up to its root.
    fn chain(&self, mut id: Option<u64>) -> Vec<&'static str> {
        let mut names = Vec::new();
        while let Some(span) = id.and_then(|id| self.spans.get(&id)) {
            names.push(span.0);
            id = span.1;
        }
        names
    }

    /// The `cache` field of the `tower_fence` span under the span named
    /// `outer`.
    fn cache_under(&self, outer: &str) -> Option<String> {
        self.spans.iter().find_map(|(id, (name, _, cache))| {
            let chain = self.chain(Some(*id));
            (*name == "tower_fence" && chain.get(1) == Some(&outer))
                .then(|| cache.clone())
                .flatten()
        })
    }
}

/// Where something ran: the span chain current then.
type Seen = Arc<Mutex<Vec<(&'static str, Option<u64>)>>>;

fn current_id() -> Option<u64> {
    tracing::Span::current().id().map(|id| id.into_u64())
}

/// A memory store that notes the span current when it is asked to
/// invalidate.
#[derive(Debug)]
struct Noting {
    inner: MemoryStore,
    seen: Seen,
}

impl Store for Noting {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>> {
        self.inner.get(key)
    }
    fn put<'a>(&'a self, key: &'a str, record: Bytes, ttl: Duration) -> StoreFuture<'a, ()> {
        self.inner.put(key, record, ttl)
    }
    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        self.inner.delete(key)
    }
    fn delete_matching<'a>(&'a self, pattern: &'a KeyPattern) -> StoreFuture<'a, u64> {
        self.seen
            .lock()
            .unwrap()
            .push(("invalidation", current_id()));
        self.inner.delete_matching(pattern)
    }
}

#[test]
fn each_request_has_a_span_and_spawned_work_runs_in_it() {
    let spans: Shared = Arc::default();
    let subscriber = tracing_subscriber::registry().with(Recording(spans.clone()));
    let seen: Seen = Arc::default();
    tracing::subscriber::with_default(subscriber, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run(seen.clone()));
    });
    let spans = spans.lock().unwrap();
    let seen = seen.lock().unwrap().clone();
    let chains: Vec<(&str, Vec<&str>)> = seen
        .iter()
        .map(|(what, id)| (*what, spans.chain(*id)))
        .collect();
    assert_eq!(
        chains,
        [
            ("origin", vec!["tower_fence", "miss"]),
            ("origin", vec!["tower_fence", "stale"]),
            ("origin", vec!["tower_fence", "write"]),
            ("invalidation", vec!["tower_fence", "write"]),
        ]
    );
    assert_eq!(spans.cache_under("miss").as_deref(), Some("miss"));
    assert_eq!(spans.cache_under("stale").as_deref(), Some("stale"));
    assert_eq!(spans.cache_under("hit").as_deref(), Some("hit"));
    assert_eq!(spans.cache_under("write").as_deref(), Some("bypass"));
}

async fn run(seen: Seen) {
    let clock = Clock::manual();
    let layer = FenceLayer::builder()
        .store(Noting {
            inner: MemoryStore::default(),
            seen: seen.clone(),
        })
        .grace(Duration::from_secs(60))
        .xfetch_beta(0.0)
        .clock(clock.clone())
        .build()
        .unwrap();
    let origin = {
        let seen = seen.clone();
        service_fn(move |request: Request<Full<Bytes>>| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(("origin", current_id()));
                let mut response = Response::new(Full::new(Bytes::from_static(b"hi")));
                if request.method() == Method::GET {
                    response
                        .headers_mut()
                        .insert("cache-control", "max-age=1".parse().unwrap());
                }
                Ok::<_, Infallible>(response)
            }
        })
    };
    let svc = layer.layer(origin);
    let send = |method: Method, span: tracing::Span| {
        let svc = svc.clone();
        async move {
            let request = Request::builder()
                .method(method)
                .uri("/page")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let response = svc.oneshot(request).instrument(span).await.unwrap();
            response.into_body().collect().await.unwrap();
        }
    };
    // A miss: its rebuild runs in a task of its own.
    send(Method::GET, tracing::info_span!("miss")).await;
    send(Method::GET, tracing::info_span!("hit")).await;
    // Stale within grace: a background refresh.
    clock.advance(Duration::from_secs(5));
    send(Method::GET, tracing::info_span!("stale")).await;
    for _ in 0..100 {
        if seen.lock().unwrap().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A write: its invalidation runs in a task of its own.
    send(Method::POST, tracing::info_span!("write")).await;
}
