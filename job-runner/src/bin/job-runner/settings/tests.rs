use clap::Parser;

use super::*;
use crate::args::Cli;

fn nodes() -> Option<Vec<String>> {
    Some(vec!["redis://127.0.0.1:7001".into()])
}

fn resolve(flags: Layer, file: Layer) -> Result<Settings, ConfigError> {
    Settings::resolve(flags, None, file, &[])
}

/// Flags are read by clap, the file by serde, both into a `Layer`: the one precedence
/// rule, flag over file over default, for every setting at once.
#[test]
fn flags_beat_file_beats_defaults() {
    let file: Layer = toml::from_str(
        "concurrency = 2\nqueue_name = \"from-file\"\nthreads = 2\n\
         lock_nodes = [\"redis://127.0.0.1:7001\"]\n[exec]\nreport = [\"./r.sh\"]\n",
    )
    .unwrap();
    let cli = Cli::try_parse_from(["job-runner", "run", "-c", "4", "--exec", "x=echo hi"]).unwrap();
    let exec = match &cli.command {
        crate::args::Command::Run(run) => run.exec.clone(),
        _ => unreachable!(),
    };
    let s = Settings::resolve(cli.settings.clone(), None, file, &exec).unwrap();
    assert_eq!(s.concurrency, 4, "flag over file");
    assert_eq!(s.threads, 2, "file over default");
    assert_eq!(s.queue_name, "from-file");
    assert_eq!(s.max_attempts, 5, "default");
    assert_eq!(
        s.exec.len(),
        2,
        "--exec adds to the file's [exec]: {:?}",
        s.exec
    );
    assert_eq!(s.exec["x"], ["sh", "-c", "echo hi"]);
    assert!(s.ledger_fencing);
    let off = Cli::try_parse_from(["job-runner", "run", "--unsafe-no-fencing"]).unwrap();
    assert!(
        !resolve(off.settings, Layer::default())
            .unwrap()
            .ledger_fencing
    );
}

#[test]
fn job_runner_queue_beats_redis_url_beats_file() {
    let file = Layer {
        queue: Some("redis://file:6379".into()),
        ..Layer::default()
    };
    let env = Some("redis://env:6379".to_owned());
    let s = Settings::resolve(Layer::default(), env.clone(), file.clone(), &[]).unwrap();
    assert_eq!(s.queue, "redis://env:6379");
    let flags = Layer {
        queue: Some("redis://flag:6379".into()),
        ..Layer::default()
    };
    assert_eq!(
        Settings::resolve(flags, env, file, &[]).unwrap().queue,
        "redis://flag:6379"
    );
}

#[test]
fn timing_settings_stay_in_range() {
    // Values whose deadlines would overflow are refused by name, not left to panic.
    let key = |flags: Layer| resolve(flags, Layer::default()).unwrap_err().key;
    let huge = |f: fn(&mut Layer)| {
        let mut layer = Layer::default();
        f(&mut layer);
        layer
    };
    assert_eq!(
        key(huge(|l| l.job_timeout_secs = Some(u64::MAX))),
        "job_timeout_secs"
    );
    assert_eq!(key(huge(|l| l.lock_ttl_ms = Some(u64::MAX))), "lock_ttl_ms");
    assert_eq!(
        key(huge(|l| l.lock_node_timeout_ms = Some(u64::MAX))),
        "lock_node_timeout_ms"
    );
    assert_eq!(
        key(huge(|l| l.lock_fence_window_ms = Some(u64::MAX))),
        "lock_fence_window_ms"
    );
    assert_eq!(
        key(huge(|l| l.lock_fence_window_ms = Some(0))),
        "lock_fence_window_ms"
    );
    assert_eq!(
        key(huge(|l| l.visibility_timeout_ms = Some(u64::MAX))),
        "visibility_timeout_ms"
    );
    assert_eq!(
        key(huge(|l| l.shutdown_timeout_secs = Some(u64::MAX))),
        "shutdown_timeout_secs"
    );
}

#[test]
fn errors_name_the_key() {
    let bad = |flags: Layer| resolve(flags, Layer::default()).unwrap_err().key;
    let with = |f: fn(&mut Layer)| {
        let mut layer = Layer {
            lock_nodes: nodes(),
            ..Layer::default()
        };
        f(&mut layer);
        layer
    };
    assert_eq!(bad(with(|l| l.concurrency = Some(0))), "concurrency");
    assert_eq!(bad(with(|l| l.threads = Some(0))), "threads");
    assert_eq!(
        bad(with(|l| l.lock_nodes = Some(vec!["http//nope".into()]))),
        "lock_nodes"
    );
    assert_eq!(
        bad(with(|l| l.visibility_timeout_ms = Some(5_000))),
        "visibility_timeout_ms"
    );
    assert_eq!(
        bad(with(|l| l.metrics_addr = Some("nine".into()))),
        "metrics_addr"
    );
    assert_eq!(bad(with(|l| l.max_attempts = Some(0))), "max_attempts");
    let no_nodes = resolve(Layer::default(), Layer::default()).unwrap();
    assert_eq!(no_nodes.require_lock_nodes().unwrap_err().key, "lock_nodes");
}

#[test]
fn unknown_file_keys_are_named() {
    let err = toml::from_str::<Layer>("concurency = 3\n").unwrap_err();
    assert!(err.to_string().contains("concurency"), "{err}");
}

#[test]
fn passwords_are_redacted() {
    assert_eq!(redact("redis://u:secret@h:1"), "redis://u:***@h:1");
    assert_eq!(redact("rediss://:secret@h:1"), "rediss://:***@h:1");
    assert_eq!(redact("redis://h:1"), "redis://h:1");
    let s = resolve(
        Layer {
            queue: Some("rediss://app:hunter2@q:6380".into()),
            lock_nodes: Some(vec!["redis://locker:hunter2@n1:6379".into()]),
            ..Layer::default()
        },
        Layer::default(),
    )
    .unwrap();
    let shown = s.to_toml();
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("rediss://app:***@q:6380"), "{shown}");
    let err = resolve(
        Layer {
            queue: Some("nope://app:hunter2@q".into()),
            ..Layer::default()
        },
        Layer::default(),
    )
    .unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
}
