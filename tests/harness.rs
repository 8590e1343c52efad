//! Tests for the test harness in `tests/support`.

mod support;

use std::time::Duration;

use bb8_redis::redis;
use support::{Origin, RedisCluster, RedisProcess};

async fn ping(conn: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<String> {
    redis::cmd("PING").query_async(conn).await
}

#[tokio::test]
async fn two_servers_get_different_ports_and_both_answer_ping() {
    let a = RedisProcess::start();
    let b = RedisProcess::start_async().await;

    assert_ne!(a.port(), b.port());
    for server in [&a, &b] {
        assert_ne!(server.port(), 6379);
        assert_eq!(server.url(), format!("redis://127.0.0.1:{}", server.port()));
        assert!(server.is_running());
        assert_eq!(ping(&mut server.conn().await).await.unwrap(), "PONG");
    }

    // The pool hands out working connections too.
    let pool = a.pool().await;
    let mut pooled = pool.get().await.unwrap();
    assert_eq!(ping(&mut pooled).await.unwrap(), "PONG");
}

#[tokio::test]
async fn dbsize_and_keys_matching_see_what_was_written() {
    let server = RedisProcess::start();
    let mut conn = server.conn().await;
    assert_eq!(server.dbsize().await, 0);

    for key in ["fence:a", "fence:b", "other:c"] {
        let () = redis::cmd("SET")
            .arg(key)
            .arg("v")
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    assert_eq!(server.dbsize().await, 3);
    assert_eq!(
        server.keys_matching("fence:*").await,
        vec!["fence:a".to_owned(), "fence:b".to_owned()]
    );
    assert!(server.keys_matching("nothing:*").await.is_empty());
}

#[tokio::test]
async fn stop_breaks_connections_and_restart_brings_it_back_on_the_same_port() {
    let mut server = RedisProcess::start();
    let port = server.port();
    let mut old = server.conn().await;
    assert_eq!(ping(&mut old).await.unwrap(), "PONG");

    server.stop();
    assert!(!server.is_running());
    server.stop(); // idempotent
    assert!(server.try_conn().await.is_err(), "connect after stop()");
    assert!(
        ping(&mut old).await.is_err(),
        "PING on a connection after stop()"
    );

    server.restart();
    assert!(server.is_running());
    assert_eq!(server.port(), port);
    assert_eq!(ping(&mut server.conn().await).await.unwrap(), "PONG");

    // Restarting a running server works as well.
    server.restart();
    assert_eq!(server.port(), port);
    assert_eq!(ping(&mut server.conn().await).await.unwrap(), "PONG");
}

#[tokio::test]
async fn pause_makes_ping_time_out_and_resume_makes_it_answer() {
    let server = RedisProcess::start();
    let mut conn = server.conn().await;
    assert_eq!(ping(&mut conn).await.unwrap(), "PONG");

    server.pause();
    assert!(server.is_running(), "a paused server is still running");
    let paused = tokio::time::timeout(Duration::from_millis(300), ping(&mut conn)).await;
    assert!(paused.is_err(), "PING answered while paused: {paused:?}");

    server.resume();
    let resumed = tokio::time::timeout(Duration::from_secs(2), async {
        ping(&mut server.conn().await).await
    })
    .await;
    assert_eq!(resumed.unwrap().unwrap(), "PONG");
}

#[tokio::test]
async fn three_master_cluster_reaches_state_ok() {
    let cluster = RedisCluster::start(3);
    let nodes = cluster.nodes();
    assert_eq!(nodes.len(), 3);

    for url in &nodes {
        assert!(url.starts_with("redis://127.0.0.1:"), "{url}");
        let mut conn = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut conn)
            .await
            .unwrap();
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .map(str::to_owned)
        };
        assert_eq!(
            field("cluster_state:").as_deref(),
            Some("ok"),
            "{url}: {info}"
        );
        assert_eq!(field("cluster_known_nodes:").as_deref(), Some("3"), "{url}");
        assert_eq!(field("cluster_size:").as_deref(), Some("3"), "{url}");
        assert_eq!(
            field("cluster_slots_assigned:").as_deref(),
            Some("16384"),
            "{url}"
        );
    }
}

#[tokio::test]
async fn origin_counts_every_call() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(router: axum::Router, uri: &str) -> String {
        let request = http::Request::get(uri)
            .body(axum::body::Body::empty())
            .unwrap();
        let response = router.oneshot(request).await.unwrap();
        assert_eq!(response.status(), http::StatusCode::OK, "{uri}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    let origin = Origin::new();
    let router = origin.router();
    assert_eq!(origin.calls(), 0);

    assert_eq!(get(router.clone(), "/hello").await, "hello");
    assert_eq!(get(router.clone(), "/count/x").await, "2");
    assert_eq!(get(router.clone(), "/slow/a/b").await, "slow:a/b:3");
    assert_eq!(origin.calls(), 3);

    // Clones share the counter.
    let twin = origin.clone();
    assert_eq!(get(twin.router(), "/count/y").await, "4");
    assert_eq!(origin.calls(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_cluster_fails_over_when_a_master_is_killed() {
    let mut cluster = tokio::task::spawn_blocking(|| RedisCluster::start_with_replicas(3, 1))
        .await
        .unwrap();
    assert_eq!(cluster.nodes().len(), 6);
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    assert_eq!(cluster.replicas().len(), 3);

    tokio::task::block_in_place(|| {
        cluster.wait_replicas_synced(Duration::from_secs(10));
        let victim = masters[0];
        let port = cluster.processes()[victim].port();
        assert!(!cluster.is_flagged_failed(port));
        cluster.kill(victim);
        assert!(!cluster.processes()[victim].is_running());
        cluster.wait_failed_over(Duration::from_secs(30));
        assert!(cluster.is_flagged_failed(port));
        // A replica took the killed master's place.
        assert_eq!(cluster.masters().len(), 3);
        assert!(!cluster.masters().contains(&victim));
        assert_eq!(cluster.replicas().len(), 2);
    });
}
