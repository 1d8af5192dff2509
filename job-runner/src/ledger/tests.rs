use super::*;

fn holder(token: u64) -> Holder<'static> {
    Holder {
        token,
        worker: "w",
        job_id: "j",
    }
}

/// Begins `token`'s work on `order`, which must be pending, and returns its writer.
fn begin(ledger: &Ledger, order: i64, amount: i64, token: u64) -> Writer<'static> {
    match ledger.begin(order, amount, holder(token)).unwrap() {
        Begin::Pending { started_us } => holder(token).writer(started_us),
        other => panic!("token {token} on order {order}: {other:?}"),
    }
}

fn temp_ledger(fencing: bool) -> (Ledger, PathBuf) {
    let path = std::env::temp_dir().join(format!(
        "ledger-unit-{}-{}.db",
        std::process::id(),
        rand::random::<u64>()
    ));
    (Ledger::open_with(&path, fencing).unwrap(), path)
}

#[test]
fn runners_opening_a_new_ledger_at_once_all_start() {
    for round in 0..20 {
        let path = std::env::temp_dir().join(format!(
            "ledger-open-{}-{round}-{}.db",
            std::process::id(),
            rand::random::<u64>()
        ));
        let start = Arc::new(std::sync::Barrier::new(8));
        let opened: Vec<_> = (0..8)
            .map(|_| {
                let (path, start) = (path.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    Ledger::open(&path).map(drop)
                })
            })
            .collect();
        for open in opened {
            if let Err(e) = open.join().unwrap() {
                panic!("round {round}: {e}: {:?}", std::error::Error::source(&e));
            }
        }
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
}

#[test]
fn a_stale_token_is_rejected_at_commit() {
    let (ledger, path) = temp_ledger(true);
    let paused = begin(&ledger, 1, 500, 5);
    // A newer holder starts and pays.
    let newer = begin(&ledger, 1, 500, 6);
    assert_eq!(ledger.commit(1, "ch_1", newer).unwrap(), Commit::Charged);
    // The paused holder wakes up and tries to commit: the order is paid, so it is
    // done, and its attempt is logged as stale.
    assert_eq!(
        ledger.commit(1, "ch_1", paused).unwrap(),
        Commit::AlreadyPaid
    );
    // So is a stale holder's begin.
    assert_eq!(ledger.begin(1, 500, holder(4)).unwrap(), Begin::AlreadyPaid);
    let order = ledger.order(1).unwrap().unwrap();
    assert!(order.paid);
    assert_eq!(order.paid_token, Some(6));
    let audit = ledger.audit().unwrap();
    assert_eq!(audit.charged, 1);
    assert_eq!(audit.stale_rejected, 2);
    assert_eq!(audit.violations(), 0, "{audit}");
    std::fs::remove_file(path).ok();
}

/// A `paid` commit is on disk before its job is acknowledged: in WAL mode only
/// `synchronous = FULL` (2) syncs each commit.
#[test]
fn commits_are_synced_before_they_return() {
    let (ledger, path) = temp_ledger(true);
    let level: i64 = ledger
        .conn()
        .pragma_query_value(None, "synchronous", |r| r.get(0))
        .unwrap();
    assert_eq!(level, 2, "synchronous is {level}, not FULL (2)");
    std::fs::remove_file(path).ok();
}

/// A duplicate job whose token is below the fence of an order that is paid (its
/// tokens came from a lock whose counter is behind) is done, not retried as stale
/// until it is dead-lettered.
#[test]
fn a_paid_order_reports_already_paid_before_stale() {
    let (ledger, path) = temp_ledger(true);
    let payer = begin(&ledger, 7, 700, 271);
    assert_eq!(ledger.commit(7, "c", payer).unwrap(), Commit::Charged);
    for token in [1, 10, 19] {
        assert_eq!(
            ledger.begin(7, 700, holder(token)).unwrap(),
            Begin::AlreadyPaid,
            "token {token}"
        );
        assert_eq!(
            ledger
                .commit(7, "c", holder(token).writer(now_us()))
                .unwrap(),
            Commit::AlreadyPaid,
            "token {token}"
        );
    }
    let audit = ledger.audit().unwrap();
    assert_eq!((audit.charged, audit.violations()), (1, 0), "{audit}");
    std::fs::remove_file(path).ok();
}

/// The schedule a chaos run found (seed 20261126): order 33 is paid; a duplicate's holder
/// (token 514) starts, and its runner is paused past the lock's TTL before it reaches the
/// ledger; the job is reclaimed, and its new holder (token 523) finds the order paid; then
/// the paused holder wakes and begins. The newer holder's visit raised the fence, so the
/// paused one is stale, and the audit finds nothing; had the paused holder's visit been
/// accepted, the audit would have caught it.
#[test]
fn a_newer_holders_visit_to_a_paid_order_fences_out_a_paused_one() {
    let (ledger, path) = temp_ledger(true);
    let payer = begin(&ledger, 33, 3300, 352);
    assert_eq!(ledger.commit(33, "c", payer).unwrap(), Commit::Charged);
    assert_eq!(
        ledger.begin(33, 3300, holder(523)).unwrap(),
        Begin::AlreadyPaid
    );
    assert_eq!(
        ledger.begin(33, 3300, holder(514)).unwrap(),
        Begin::AlreadyPaid
    );
    assert_eq!(ledger.order(33).unwrap().unwrap().fence, 523);
    let attempts = ledger.attempts().unwrap();
    let outcome = |token| attempts.iter().find(|a| a.token == token).unwrap().outcome;
    assert_eq!(outcome(523), Outcome::AlreadyPaid);
    assert_eq!(outcome(514), Outcome::StaleRejected);
    let audit = ledger.audit().unwrap();
    assert_eq!(audit.violations(), 0, "{audit}");

    // The same log with the paused holder's visit accepted is what the audit rejects.
    let mut accepted = attempts.clone();
    for a in &mut accepted {
        if a.token == 514 {
            a.outcome = Outcome::AlreadyPaid;
        }
    }
    let audit = Audit::of(&ledger.orders().unwrap(), &accepted);
    assert_eq!(audit.stale_accepted, vec![(33, 514, 523)], "{audit}");
    std::fs::remove_file(path).ok();
}

#[test]
fn a_begun_newer_holder_fences_out_an_older_one_before_either_commits() {
    let (ledger, path) = temp_ledger(true);
    let older = begin(&ledger, 2, 100, 5);
    let newer = begin(&ledger, 2, 100, 6);
    assert_eq!(
        ledger.commit(2, "c", older).unwrap(),
        Commit::Stale { fence: 6 }
    );
    assert_eq!(ledger.commit(2, "c", newer).unwrap(), Commit::Charged);
    assert_eq!(
        ledger.commit(2, "c", holder(7).writer(now_us())).unwrap(),
        Commit::AlreadyPaid
    );
    std::fs::remove_file(path).ok();
}

#[test]
fn without_the_fence_the_audit_sees_the_damage() {
    let (ledger, path) = temp_ledger(false);
    // Holder 5 pauses; holder 6 begins; holder 5 wakes and commits: accepted, since
    // the check is off. Holder 6 then finds it paid.
    let paused = begin(&ledger, 3, 100, 5);
    let newer = begin(&ledger, 3, 100, 6);
    assert_eq!(ledger.commit(3, "c", paused).unwrap(), Commit::Charged);
    assert_eq!(ledger.commit(3, "c", newer).unwrap(), Commit::AlreadyPaid);
    let audit = ledger.audit().unwrap();
    assert_eq!(audit.overlapping.len(), 1, "{audit}");
    assert!(audit.violations() > 0);
    std::fs::remove_file(path).ok();
}

#[test]
fn amounts_must_agree() {
    let (ledger, path) = temp_ledger(true);
    ledger.create_order(4, 100).unwrap();
    let err = ledger.begin(4, 200, holder(1)).unwrap_err();
    assert!(!err.is_retryable());
    assert_eq!(
        err.to_string(),
        "order 4 is recorded with amount 100 cents, the job asks for 200"
    );
    std::fs::remove_file(path).ok();
}

#[test]
fn audit_counts_double_charges() {
    let orders = vec![Order {
        order_id: 1,
        amount_cents: 1,
        paid: true,
        fence: 2,
        paid_token: Some(2),
        paid_by: None,
        charge_id: None,
    }];
    let attempt = |token, s, e| Attempt {
        order_id: 1,
        token,
        worker: "w".into(),
        job_id: "j".into(),
        outcome: Outcome::Charged,
        started_us: s,
        finished_us: e,
    };
    let audit = Audit::of(&orders, &[attempt(1, 0, 10), attempt(2, 20, 30)]);
    assert_eq!(audit.double_charged, vec![(1, 2)]);
    assert!(audit.overlapping.is_empty());
    let audit = Audit::of(&orders, &[attempt(2, 0, 10), attempt(1, 5, 30)]);
    assert_eq!(audit.overlapping, vec![(1, 1, 2)]);
    assert_eq!(audit.stale_accepted, vec![(1, 1, 2)]);
}
