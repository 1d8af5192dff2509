//! The binary against a Redis that takes only TLS and only an ACL user: `enqueue`, `run`,
//! `info` and `lock exec` over `rediss://user:pass@…` for the queue and the lock node,
//! with certificates made here, and the password never in their output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use fencelock_test_support::{free_port, temp_path};
use testcontainers::core::{Mount, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

const BIN: &str = env!("CARGO_BIN_EXE_job-runner");
const USER: &str = "runner";
const PASSWORD: &str = "s3cret-Pw-7f1d";

/// A CA, and a certificate for 127.0.0.1 it signed, made with the `openssl` command.
fn make_certs(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let openssl = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl command (Debian: apt-get install openssl)");
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509", "-new"],
            &ec[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=job-runner test CA",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req", "-new"],
            &ec[..],
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

/// A free port below the ephemeral range.
/// A node that speaks only TLS on `port`, where the default user is off and `USER` may
/// do everything.
async fn tls_node(certs: &Path, port: u16) -> ContainerAsync<GenericImage> {
    let port = port.to_string();
    let password = format!(">{PASSWORD}");
    GenericImage::new("redis", "7.0")
        .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
        .with_mount(Mount::bind_mount(certs.display().to_string(), "/certs"))
        .with_cmd([
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            port.as_str(),
            "--tls-cert-file",
            "/certs/server.pem",
            "--tls-key-file",
            "/certs/server.key",
            "--tls-ca-cert-file",
            "/certs/ca.pem",
            "--tls-auth-clients",
            "no",
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--user",
            "default",
            "off",
            "--user",
            USER,
            "on",
            password.as_str(),
            "~*",
            "&*",
            "+@all",
        ])
        .with_network("host")
        .with_label("fencelock-test", "node")
        .with_startup_timeout(Duration::from_secs(60))
        .start()
        .await
        .expect("start a TLS redis:7.0 node (run scripts/redis-image.sh first)")
}

fn job_runner(ca: &Path, queue: &str, lock_node: &str) -> Command {
    let mut cmd = fencelock_test_support::binary::job_runner(BIN, &[]);
    cmd.env("SSL_CERT_FILE", ca)
        .env("JOB_RUNNER_QUEUE", queue)
        .env("JOB_RUNNER_LOCK_NODES", lock_node)
        .env("JOB_RUNNER_METRICS_ADDR", "off")
        .env("RUST_LOG", "info");
    cmd
}

/// The output, checked for what must never be in it: the password, or colour codes
/// (the output is a pipe).
fn clean(o: Output) -> (Option<i32>, String, String) {
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    for text in [&stdout, &stderr] {
        assert!(!text.contains(PASSWORD), "the password leaked:\n{text}");
        assert!(!text.contains('\x1b'), "colour codes in a pipe:\n{text}");
    }
    (o.status.code(), stdout, stderr)
}

#[tokio::test(flavor = "multi_thread")]
async fn rediss_with_an_acl_user_works_for_the_queue_and_the_lock_node() {
    let certs: PathBuf = temp_path("tls-certs").with_extension("d");
    make_certs(&certs);
    let (queue_port, lock_port) = (free_port(), free_port());
    let (_queue_node, _lock_node) =
        tokio::join!(tls_node(&certs, queue_port), tls_node(&certs, lock_port));
    let url = |port: u16| format!("rediss://{USER}:{PASSWORD}@127.0.0.1:{port}");
    let ca = certs.join("ca.pem");
    let (queue, lock) = (url(queue_port), url(lock_port));
    let jr = || job_runner(&ca, &queue, &lock);

    let (code, ids, stderr) = clean(
        jr().args(["enqueue", "noop", "--resource", "tls:1", "--count", "3"])
            .output()
            .unwrap(),
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(ids.lines().count(), 3, "{ids}");

    let (code, _, stderr) = clean(jr().args(["run", "--once", "-t", "5"]).output().unwrap());
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stderr.matches("outcome=\"done\"").count() + stderr.matches("outcome=done").count(),
        3,
        "{stderr}"
    );

    let (code, info, stderr) = clean(jr().arg("info").output().unwrap());
    assert_eq!(code, Some(0), "{stderr}");
    for line in ["depth     0", "pending   0", "dead      0"] {
        assert!(info.contains(line), "{info}");
    }
    assert!(
        info.contains(&format!("rediss://{USER}:***@127.0.0.1:{queue_port}")),
        "{info}"
    );
    assert!(!info.contains("unreachable"), "{info}");

    let (code, _, stderr) = clean(
        jr().args([
            "lock",
            "exec",
            "--resource",
            "tls-flock",
            "--",
            "sh",
            "-c",
            "test -n \"$FENCING_TOKEN\"",
        ])
        .output()
        .unwrap(),
    );
    assert_eq!(code, Some(0), "{stderr}");

    // The checks can fail: a wrong password and plain TCP to a TLS port are refused, and
    // say why once, without the password.
    let wrong = format!("rediss://{USER}:not-{PASSWORD}@127.0.0.1:{queue_port}");
    let (code, _, stderr) = clean(
        jr().env("JOB_RUNNER_QUEUE", &wrong)
            .arg("info")
            .output()
            .unwrap(),
    );
    assert_eq!(code, Some(69), "{stderr}");
    assert!(stderr.contains("cannot reach the queue"), "{stderr}");
    let plain = format!("redis://{USER}:{PASSWORD}@127.0.0.1:{queue_port}");
    let (code, _, stderr) = clean(
        jr().env("JOB_RUNNER_QUEUE", &plain)
            .arg("info")
            .output()
            .unwrap(),
    );
    assert_eq!(code, Some(69), "{stderr}");
    let _ = std::fs::remove_dir_all(&certs);
}
