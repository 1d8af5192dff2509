//! A TCP link in front of a node that a test can cut and heal, or reset: the network faults
//! that stopping or pausing the node's container does not give.
//!
//! A cut holds every byte in transit until the link heals, as TCP would deliver them after
//! a partition shorter than its retransmission timeout: commands sent during the cut reach
//! the node late, and their replies come back late. A reset closes every connection through
//! the link, as a long partition or a killed connection would.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct Link {
    port: u16,
    cut: watch::Sender<bool>,
    resets: watch::Sender<u64>,
    accept: JoinHandle<()>,
}

impl Link {
    /// A link on a port of its own to the node listening on `127.0.0.1:target`.
    pub async fn to(target: u16) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a link");
        let port = listener.local_addr().expect("link address").port();
        let (cut, cut_rx) = watch::channel(false);
        let (resets, resets_rx) = watch::channel(0u64);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let cut = cut_rx.clone();
                let mut resets = resets_rx.clone();
                // Only resets made from now on close this connection.
                resets.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(node) = TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = node.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (node_read, node_write) = node.into_split();
                    // Whichever ends first ends the connection; dropping both halves closes
                    // both sockets. A dropped `Link` ends every connection too: its senders
                    // go, and `changed` and `wait_for` fail.
                    tokio::select! {
                        () = pump(client_read, node_write, cut.clone()) => {}
                        () = pump(node_read, client_write, cut) => {}
                        _ = resets.changed() => {}
                    }
                });
            }
        });
        Link {
            port,
            cut,
            resets,
            accept,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Partitions the node: nothing crosses the link until [`heal`](Self::heal).
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Ends the partition: the bytes held during it go on, in order.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }

    /// Closes every connection through the link now; new ones may open at once.
    pub fn reset(&self) {
        self.resets.send_modify(|n| *n += 1);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies `from` to `to`, never while the link is cut: a read that completes during a cut
/// holds its bytes until the link heals.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut cut: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if cut.wait_for(|c| !*c).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cut.wait_for(|c| !*c).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
