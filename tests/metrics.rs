//! With the feature `metrics`, the layer reports to the installed
//! recorder: each response by outcome and route (the rule's pattern, never
//! the raw path), bypasses by reason, its counters, store calls and
//! invalidations.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use metrics_exporter_prometheus::PrometheusBuilder;
use tower::{service_fn, Layer, ServiceExt};
use tower_fence::policy::rules::Rule;
use tower_fence::FenceLayer;

/// `name{labels} value` lines of the Prometheus text, as (name, sorted
/// labels) → value.
fn samples(text: &str) -> BTreeMap<(String, String), f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let mut labels: Vec<&str> = rest.trim_end_matches('}').split(',').collect();
                labels.sort();
                (name.to_owned(), labels.join(","))
            }
            None => (series.to_owned(), String::new()),
        };
        out.insert((name, labels), value.parse().unwrap());
    }
    out
}

#[test]
fn responses_counters_and_store_calls_reach_the_recorder() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run());
    });
    let samples = samples(&handle.render());
    let get =
        |name: &str, labels: &str| samples.get(&(name.to_owned(), labels.to_owned())).copied();
    let route = r#"route="/products/{id}""#;
    assert_eq!(
        get(
            "tower_fence_requests_total",
            &format!(r#"outcome="miss",{route}"#)
        ),
        Some(2.0),
        "{samples:#?}"
    );
    assert_eq!(
        get(
            "tower_fence_requests_total",
            &format!(r#"outcome="hit",{route}"#)
        ),
        Some(1.0)
    );
    // No rule: the route is empty, never the path.
    assert_eq!(
        get("tower_fence_requests_total", r#"outcome="miss",route="""#),
        Some(1.0)
    );
    assert!(samples
        .keys()
        .all(|(_, labels)| !labels.contains("/products/1")));
    assert_eq!(
        get(
            "tower_fence_requests_total",
            &format!(r#"outcome="bypass",{route}"#)
        ),
        Some(1.0)
    );
    assert_eq!(
        get(
            "tower_fence_bypasses_total",
            &format!(r#"reason="method",{route}"#)
        ),
        Some(1.0)
    );
    assert_eq!(get("tower_fence_hits_total", ""), Some(1.0));
    assert_eq!(get("tower_fence_misses_total", ""), Some(3.0));
    assert_eq!(get("tower_fence_stores_total", ""), Some(3.0));
    assert_eq!(
        get("tower_fence_store_calls_total", r#"op="fill",result="ok""#),
        Some(3.0)
    );
    assert!(get("tower_fence_store_call_seconds_count", r#"op="get""#).unwrap() >= 4.0);
    assert_eq!(
        get(
            "tower_fence_invalidations_total",
            r#"purge="hard",result="ok""#
        ),
        Some(1.0)
    );
    // The write removed /products/1 (after the second miss refilled it).
    assert_eq!(
        get("tower_fence_invalidated_keys_total", r#"purge="hard""#),
        Some(1.0)
    );
}

async fn run() {
    let layer = FenceLayer::builder()
        .rule(Rule::path("/products/{id}").ttl(Duration::from_secs(60)))
        .build()
        .unwrap();
    let origin = service_fn(|_request: Request<Full<Bytes>>| async {
        let mut response = Response::new(Full::new(Bytes::from_static(b"product")));
        response
            .headers_mut()
            .insert("cache-control", "max-age=60".parse().unwrap());
        Ok::<_, Infallible>(response)
    });
    let svc = layer.layer(origin);
    for (method, path) in [
        (Method::GET, "/products/1"),
        (Method::GET, "/products/1"),
        (Method::GET, "/products/2"),
        (Method::GET, "/elsewhere"),
        (Method::POST, "/products/1"),
    ] {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = svc.clone().oneshot(request).await.unwrap();
        response.into_body().collect().await.unwrap();
    }
}
