//! The typed operations against the scripts' wire form.

use super::*;

#[test]
fn values_are_128_bit_and_unique() {
    let a = new_value();
    let b = new_value();
    assert_eq!(a.len(), 32);
    assert_ne!(a, b);
}

#[test]
fn values_have_the_shape_is_value_recognises() {
    for _ in 0..1000 {
        assert!(is_value(new_value().as_bytes()));
    }
    for other in [
        "",
        "1",
        "0123456789ABCDEF0123456789ABCDEF",
        "0123456789abcdef0123456789abcdeg",
    ] {
        assert!(!is_value(other.as_bytes()), "{other:?}");
    }
    assert!(!is_value(format!("{}0", new_value()).as_bytes()));
}

#[test]
fn batch_numbers_follow_the_scripts_order() {
    let keys: Arc<[String]> = Arc::from(["k".to_owned()]);
    let ops = [
        Op::Acquire(Acquire {
            keys: keys.clone(),
            value: "v".into(),
            ttl_ms: 1,
            quarantine_ms: 1,
            fencing: None,
        }),
        Op::Release(Release {
            keys: keys.clone(),
            values: vec![],
        }),
        Op::Extend(Extend {
            keys: keys.clone(),
            ttl_ms: 1,
            values: vec![],
        }),
        Op::Handoff(Handoff {
            keys: keys.clone(),
            value: "v".into(),
            ttl_ms: 1,
            fencing: None,
            chain: vec![],
        }),
        Op::Fence(Fence {
            keys,
            value: "v".into(),
            last_token: 1,
            window_ms: 1,
        }),
        Op::Seed(Seed {
            quarantine_ms: 1,
            nonce: "n".into(),
            high: 0,
        }),
        Op::Init(Init {
            nonce: "n".into(),
            quarantine_ms: 1,
        }),
        Op::Verify(Verify {
            run_id: "r".into(),
            durable: false,
            quarantine_ms: 1,
            nonce: "n".into(),
        }),
        Op::Genesis(Genesis {
            step: GenesisStep::Claim,
            nonce: "n".into(),
            decision: "d".into(),
        }),
    ];
    for op in &ops {
        assert_eq!(op.number(), scripts::number(op.script()), "{op:?}");
    }
}

#[test]
fn every_outcome_reads_back_from_its_wire_form() {
    let acquire = Op::Acquire(Acquire {
        keys: Arc::from(["k".to_owned()]),
        value: "v".into(),
        ttl_ms: 1,
        quarantine_ms: 1,
        fencing: Some(Fencing {
            reserved: 3,
            window_ms: 9,
            hint: 5,
        }),
    });
    for reply in [-2, -1, 0, 1, 7] {
        assert_eq!(acquire.decode(reply).unwrap().wire(), reply);
    }
    assert!(acquire.decode(-3).is_err());
    assert_eq!(
        acquire.args(),
        [&b"v"[..], b"1", b"1", b"1", b"3", b"9", b"5"].map(<[u8]>::to_vec)
    );
    assert_eq!(
        acquire.keys(),
        [
            "k",
            "fencelock:fence:{k}",
            "fencelock:fence:high",
            "fencelock:fence:floor",
            "fencelock:node"
        ]
    );
}
