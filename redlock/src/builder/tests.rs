//! The builder's checks of its settings.

use super::*;
use crate::ErrorKind;

async fn build_err(b: RedlockBuilder) -> crate::Error {
    b.build().await.expect_err("build must fail")
}

#[tokio::test]
async fn zero_nodes() {
    let e = build_err(RedlockBuilder::default()).await;
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(
        e.to_string().starts_with("invalid `nodes`: no nodes given"),
        "{e}"
    );
}

#[tokio::test]
async fn duplicate_nodes() {
    let e = build_err(
        RedlockBuilder::default().nodes(["redis://127.0.0.1:1", "redis://127.0.0.1:1/0"]),
    )
    .await;
    assert_eq!(
        e.to_string(),
        "invalid `nodes[1]`: 127.0.0.1:1 is the same node as nodes[0]; one node must not vote twice"
    );
    // Another database on the same server is the same machine too, but it is a distinct
    // keyspace; we accept it like redsync does, so that one test server can host several.
    assert!(
        RedlockBuilder::default()
            .nodes(["redis://127.0.0.1:1/1", "redis://127.0.0.1:1/2"])
            .connect_timeout(Duration::from_millis(10))
            .build()
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn drift_factor_range() {
    for bad in [-0.1, 0.5, 0.7, f64::NAN] {
        let e = build_err(
            RedlockBuilder::default()
                .node("redis://127.0.0.1:1")
                .drift_factor(bad),
        )
        .await;
        assert!(e.to_string().starts_with("invalid `drift_factor`"), "{e}");
    }
}

#[tokio::test]
async fn unparsable_url() {
    let e = build_err(RedlockBuilder::default().nodes(["redis://127.0.0.1:1", "nope://x"])).await;
    assert!(
        e.to_string()
            .starts_with("invalid `nodes[1]`: cannot use `nope://x`"),
        "{e}"
    );
}

#[tokio::test]
async fn zero_timeout() {
    let e = build_err(
        RedlockBuilder::default()
            .node("redis://127.0.0.1:1")
            .node_timeout(Duration::ZERO),
    )
    .await;
    assert_eq!(
        e.to_string(),
        "invalid `node_timeout`: must be greater than zero"
    );
}

#[tokio::test]
async fn unreachable_nodes_do_not_fail_build() {
    let client = RedlockBuilder::default()
        .nodes(["redis://127.0.0.1:1", "redis://127.0.0.1:2"])
        .connect_timeout(Duration::from_millis(50))
        .build()
        .await
        .expect("unreachable nodes are retried, not fatal");
    assert_eq!(client.quorum(), 2);
}

#[tokio::test]
async fn fence_window_range() {
    for bad in [Duration::ZERO, MAX_FENCE_WINDOW + Duration::from_millis(1)] {
        let e = build_err(
            RedlockBuilder::default()
                .node("redis://127.0.0.1:1")
                .fence_window(bad),
        )
        .await;
        assert!(e.to_string().starts_with("invalid `fence_window`"), "{e}");
    }
    assert_eq!(RedlockBuilder::default().fence_window, DEFAULT_FENCE_WINDOW);
}
