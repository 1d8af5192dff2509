//! The shared test fixture: N real `redis:7.0` nodes in containers, with faults on demand.
//!
//! Every node runs on the host's network namespace at a port chosen up front, so that a
//! stopped and restarted node comes back at the address the client already has (a mapped
//! port would change), and no docker-proxy sits between client and node. Nodes run without persistence (`--save "" --appendonly no`): a restart empties
//! them, which is the harshest case for the lock; `start_with_aof` gives nodes that keep
//! their data.
#![allow(dead_code, unreachable_pub)]

pub mod binary;
mod link;
pub use link::Link;

use std::net::TcpListener;

use rand::SeedableRng;
use std::time::{Duration, Instant};

use fencelock::Redlock;
use futures_util::future::join_all;
use redis::AsyncCommands;
use testcontainers::bollard::query_parameters::KillContainerOptions;
use testcontainers::core::WaitFor;
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

/// A node timeout that tolerates a loaded 2-core CI machine running five containers.
pub const TEST_NODE_TIMEOUT: Duration = Duration::from_millis(250);

pub struct Node {
    container: ContainerAsync<GenericImage>,
    port: u16,
}

impl Node {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

pub struct Cluster {
    pub nodes: Vec<Node>,
}

/// A port that is free now, below the kernel's ephemeral range (32768 and up), so that
/// outgoing connections do not take it before the node binds it.
pub fn free_port() -> u16 {
    use rand::Rng;
    let mut rng = rand::rngs::SmallRng::from_os_rng();
    loop {
        let port = rng.random_range(20_000..32_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

async fn start_node(aof: bool) -> Node {
    // Another process may still take the port between our check and the node's bind;
    // then the container exits at once, and another port is tried.
    let mut last_error = None;
    for _ in 0..5 {
        match try_start_node(aof).await {
            Ok(node) => return node,
            Err(e) => last_error = Some(e),
        }
    }
    panic!("start a redis:7.0 container (run scripts/redis-image.sh first): {last_error:?}");
}

async fn try_start_node(aof: bool) -> Result<Node, testcontainers::TestcontainersError> {
    let port = free_port();
    let port_arg = port.to_string();
    // Host networking: the node listens on 127.0.0.1:<port> itself, with no docker-proxy
    // hop in between, so latency figures are Redis's and not the proxy's, and the port
    // survives a stop and start.
    let image = GenericImage::new("redis", "7.0")
        .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
        .with_cmd([
            "redis-server",
            "--port",
            port_arg.as_str(),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            if aof { "yes" } else { "no" },
            "--appendfsync",
            "always",
        ])
        .with_network("host")
        .with_label("fencelock-test", "node")
        .with_startup_timeout(Duration::from_secs(60));
    let container = image.start().await?;
    Ok(Node { container, port })
}

impl Cluster {
    /// Starts `n` nodes in parallel.
    pub async fn start(n: usize) -> Cluster {
        let nodes = join_all((0..n).map(|_| start_node(false))).await;
        Cluster { nodes }
    }

    /// Starts `n` nodes with AOF persistence (fsync on every write): a restart keeps their
    /// data.
    pub async fn start_with_aof(n: usize) -> Cluster {
        let nodes = join_all((0..n).map(|_| start_node(true))).await;
        Cluster { nodes }
    }

    /// A [`Link`] in front of every node, for tests that cut nodes off or reset their
    /// connections. Clients built on the links' URLs see the faults; `conn`, `keys` and
    /// the other checks still go to the nodes directly.
    pub async fn links(&self) -> Vec<Link> {
        join_all(self.nodes.iter().map(|n| Link::to(n.port))).await
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// A client over every node, with the test node timeout.
    pub async fn client(&self) -> Redlock {
        Redlock::builder()
            .nodes(self.urls())
            .node_timeout(TEST_NODE_TIMEOUT)
            .build()
            .await
            .expect("build a client")
    }

    pub async fn conn(&self, i: usize) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.nodes[i].url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to a node directly")
    }

    /// `docker stop`: the node goes away and, when started again, comes back empty.
    pub async fn stop(&self, i: usize) {
        self.nodes[i]
            .container
            .stop_with_timeout(Some(0))
            .await
            .expect("stop node");
    }

    /// `docker start` after a stop or kill, waiting until the node answers PING.
    pub async fn start_again(&self, i: usize) {
        self.nodes[i].container.start().await.expect("start node");
        self.wait_ready(i).await;
    }

    /// SIGKILL the redis-server process.
    pub async fn kill(&self, i: usize) {
        let docker = testcontainers::core::client::docker_client_instance()
            .await
            .expect("docker client");
        docker
            .kill_container(
                self.nodes[i].container.id(),
                Some(KillContainerOptions {
                    signal: "SIGKILL".into(),
                }),
            )
            .await
            .expect("kill node");
    }

    /// `docker pause` (SIGSTOP-like): the port stays open, nothing answers.
    pub async fn pause(&self, i: usize) {
        self.nodes[i].container.pause().await.expect("pause node");
    }

    pub async fn unpause(&self, i: usize) {
        self.nodes[i]
            .container
            .unpause()
            .await
            .expect("unpause node");
    }

    /// Stop and start: the node comes back empty at the same address.
    pub async fn restart_empty(&self, i: usize) {
        self.stop(i).await;
        self.start_again(i).await;
    }

    async fn wait_ready(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.ping(i).await {
                return;
            }
            assert!(Instant::now() < deadline, "node {i} did not come back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn ping(&self, i: usize) -> bool {
        let Ok(client) = redis::Client::open(self.nodes[i].url()) else {
            return false;
        };
        let connect = client.get_multiplexed_async_connection();
        let Ok(Ok(mut c)) = tokio::time::timeout(Duration::from_secs(1), connect).await else {
            return false;
        };
        redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .is_ok()
    }

    /// Every lock key on node `i`: all keys but fencelock's own bookkeeping (the node's
    /// restart state, and the fencing state, whose counters outlive the locks by the fence
    /// window).
    pub async fn keys(&self, i: usize) -> Vec<String> {
        let mut keys = self.all_keys(i).await;
        keys.retain(|k| !k.starts_with("fencelock:"));
        keys
    }

    /// Every key on node `i`, bookkeeping included.
    pub async fn all_keys(&self, i: usize) -> Vec<String> {
        let mut c = self.conn(i).await;
        let mut keys: Vec<String> = c.keys("*").await.expect("KEYS");
        keys.sort();
        keys
    }

    /// Locks `key` on node `i` the way node-redlock v5 and redsync do:
    /// `SET key <value> NX PX 30000`. Returns whether the node granted it.
    pub async fn foreign_set_nx(&self, i: usize, key: &str, value: &str) -> bool {
        let mut c = self.conn(i).await;
        let reply: redis::Value = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("NX")
            .arg("PX")
            .arg(30_000)
            .query_async(&mut c)
            .await
            .expect("SET NX PX");
        reply != redis::Value::Nil
    }

    /// Waits (up to 1 s) until every node holds `key` with `value`: a lock returns at a
    /// quorum, and the last node's SET may still be on its way.
    pub async fn wait_all_hold(&self, key: &str, value: &str) {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let mut n = 0;
            for i in 0..self.nodes.len() {
                let mut c = self.conn(i).await;
                let v: Option<String> = c.get(key).await.unwrap();
                n += usize::from(v.as_deref() == Some(value));
            }
            if n == self.nodes.len() {
                return;
            }
            if Instant::now() >= deadline {
                let mut seen = Vec::new();
                for i in 0..self.nodes.len() {
                    seen.push(format!("node {i}: {:?}", self.all_keys(i).await));
                }
                panic!("only {n} nodes hold {key}: {seen:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// How many nodes hold `key`.
    pub async fn holders(&self, key: &str) -> usize {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        self.holders_on(&all, key).await
    }

    /// How many of the listed nodes hold `key`.
    pub async fn holders_on(&self, nodes: &[usize], key: &str) -> usize {
        let mut n = 0;
        for &i in nodes {
            let mut c = self.conn(i).await;
            let exists: bool = c.exists(key).await.unwrap();
            n += usize::from(exists);
        }
        n
    }

    /// The fixture check after every test: within `grace`, no key is left on any node.
    /// Nodes that are down or paused must be brought back first.
    pub async fn assert_no_keys_within(&self, grace: Duration) {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        self.assert_no_keys_on(&all, grace).await;
    }

    /// As [`assert_no_keys_within`], on the listed nodes only (the others may be paused).
    pub async fn assert_no_keys_on(&self, nodes: &[usize], grace: Duration) {
        let deadline = Instant::now() + grace;
        loop {
            let mut left = Vec::new();
            for &i in nodes {
                for k in self.keys(i).await {
                    let mut c = self.conn(i).await;
                    let value: Option<String> = c.get(&k).await.unwrap_or(None);
                    let pttl: i64 = c.pttl(&k).await.unwrap_or(-3);
                    left.push(format!("node {i}: {k} = {value:?}, pttl {pttl} ms"));
                }
            }
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "keys left behind: {left:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn assert_no_keys(&self) {
        self.assert_no_keys_within(Duration::from_secs(1)).await;
    }

    /// `DBSIZE` of node `i`: every key, bookkeeping included.
    pub async fn dbsize(&self, i: usize) -> u64 {
        let mut c = self.conn(i).await;
        redis::cmd("DBSIZE")
            .query_async(&mut c)
            .await
            .expect("DBSIZE")
    }

    /// `used_memory` of node `i`, from `INFO memory`, in bytes.
    pub async fn used_memory(&self, i: usize) -> u64 {
        let mut c = self.conn(i).await;
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut c)
            .await
            .expect("INFO memory");
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("used_memory in INFO memory")
    }

    /// Removes every container now (their Drop would too, but later and less visibly).
    pub async fn teardown(self) {
        join_all(self.nodes.into_iter().map(|n| async move {
            let _ = n.container.rm().await;
        }))
        .await;
    }
}

/// A lock client with fencing tokens over `urls`, as the job runner needs.
pub async fn fenced_client(urls: &[String]) -> Redlock {
    Redlock::builder()
        .nodes(urls.iter().cloned())
        .node_timeout(TEST_NODE_TIMEOUT)
        .fencing(true)
        .build()
        .await
        .expect("build a fenced client")
}

/// A fresh path under the temp dir, for a ledger file.
pub fn temp_path(name: &str) -> std::path::PathBuf {
    use rand::Rng;
    let n: u64 = rand::rngs::SmallRng::from_os_rng().random();
    std::env::temp_dir().join(format!("{name}-{}-{n:x}.db", std::process::id()))
}

/// Polls `check` every 50 ms until it holds; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `scenario` as the code is, where it must hold, then with `bug` planted, where its
/// check must fire; prints what it caught. A checker never shown to fire proves nothing.
pub async fn holds_and_catches<B, F, Fut>(scenario: F, bug: B)
where
    B: std::fmt::Debug + Copy,
    F: Fn(Option<B>) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    scenario(None).await.unwrap();
    let caught = scenario(Some(bug)).await;
    eprintln!(
        "with {bug:?} planted: {}",
        caught.expect_err("the planted bug went unnoticed")
    );
}
