//! The node's own tests: URLs and the driver's backlog cap.

use super::*;
use futures_util::FutureExt;

const POLICY: NodePolicy = NodePolicy {
    quarantine_ms: 30_000,
    allow_eviction: false,
};

#[test]
fn redacts_passwords() {
    assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    assert_eq!(
        redact("redis://user:secret@h:6379/0"),
        "redis://user:***@h:6379/0"
    );
    assert_eq!(redact("rediss://:secret@h"), "rediss://:***@h");
}

#[tokio::test]
async fn bad_urls_name_the_field_and_hide_the_password() {
    let err = Node::new("nodes[1]", "http://u:pw@h", Duration::from_secs(1), POLICY).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("invalid `nodes[1]`: cannot use `http://u:***@h`"),
        "{msg}"
    );
    assert!(!msg.contains("pw"), "{msg}");
}

/// A node that accepts connections and never answers: the driver's first command hangs,
/// calls pile up behind it up to the cap, and the next one fails at once instead of
/// growing the queue.
#[tokio::test]
async fn calls_to_a_node_that_stopped_answering_are_capped() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().collect();
        drop(held);
    });
    let (node, _) = Node::new(
        "nodes[0]",
        &format!("redis://{addr}"),
        Duration::from_secs(60),
        POLICY,
    )
    .unwrap();
    let payload = Payload::new(Op::Release(crate::ops::Release {
        keys: Arc::from(["k".to_owned()]),
        values: vec!["v".into()],
    }));
    let mut first = node.eval_shared(&payload, None);
    // Let the driver take the first call and hang on it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!((&mut first).now_or_never().is_none());

    let mut waiting: Vec<Reply> = (0..MAX_BACKLOG)
        .map(|_| node.eval_shared(&payload, None))
        .collect();
    let refused = tokio::time::timeout(Duration::from_secs(1), node.eval_shared(&payload, None))
        .await
        .expect("the call over the cap fails at once")
        .unwrap_err();
    assert!(
        format!("{refused:?}").contains("too many calls waiting for this node"),
        "{refused:?}"
    );
    // Those within the cap still wait for the node.
    assert!((&mut waiting[0]).now_or_never().is_none());
    assert!(waiting.last_mut().unwrap().now_or_never().is_none());
}
