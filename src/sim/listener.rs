//! The simulator's listener: a TCP listener that closes during `refuse`
//! windows and reopens on the same address after, and connections that it
//! cuts when such a window opens.
//!
//! While closed, connecting gets "connection refused" from the kernel. Open
//! connections (idle keep-alive ones and those with a request in flight) end
//! with an I/O error on their next read or write, which hyper answers by
//! closing the socket, so a client sees a connection error, as with a
//! provider whose front end went away.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

use super::fault::ListenPlan;
use super::service::Shared;

/// Pause before retrying a failed bind or accept.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Pending connections the kernel queues for us (tokio's own default).
const BACKLOG: u32 = 1024;

/// Binds `addr` with `SO_REUSEADDR`, so the port can be taken again at the
/// end of a `refuse` window while the connections it cut sit in TIME_WAIT.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

pub(crate) struct FaultListener {
    /// The bound address, port included: where it reopens.
    addr: SocketAddr,
    listener: Option<TcpListener>,
    shared: Arc<Shared>,
    /// Wakes the accept loop when faults or the clock change.
    changes: watch::Receiver<()>,
    /// Bumped when a refusal starts: every connection accepted before is cut.
    cut: watch::Sender<u64>,
}

impl FaultListener {
    pub(crate) fn new(listener: TcpListener, addr: SocketAddr, shared: Arc<Shared>) -> Self {
        let changes = shared.subscribe_fault_changes();
        FaultListener {
            addr,
            listener: Some(listener),
            shared,
            changes,
            cut: watch::Sender::new(0),
        }
    }

    fn close(&mut self) {
        if self.listener.take().is_some() {
            self.cut.send_modify(|generation| *generation += 1);
            tracing::info!(addr = %self.addr, "simulated provider refuses connections");
        }
    }
}

impl axum::serve::Listener for FaultListener {
    type Io = CutStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (CutStream, SocketAddr) {
        loop {
            self.changes.borrow_and_update();
            match self.shared.listen_plan() {
                ListenPlan::Refuse { for_ } => {
                    self.close();
                    tokio::select! {
                        _ = tokio::time::sleep(for_) => {}
                        _ = changed(&mut self.changes) => {}
                    }
                }
                ListenPlan::Open { next_refusal_in } => {
                    if self.listener.is_none() {
                        match bind(self.addr) {
                            Ok(listener) => {
                                tracing::info!(addr = %self.addr, "simulated provider accepts connections again");
                                self.listener = Some(listener);
                            }
                            Err(error) => {
                                tracing::warn!(addr = %self.addr, %error, "simulated provider cannot listen again; retrying");
                                tokio::time::sleep(RETRY_PAUSE).await;
                                continue;
                            }
                        }
                    }
                    let Some(listener) = &self.listener else {
                        continue;
                    };
                    let refusal = async {
                        match next_refusal_in {
                            Some(wait) => tokio::time::sleep(wait).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((tcp, remote)) => {
                                // Small JSON answers: don't let Nagle hold them back.
                                if let Err(error) = tcp.set_nodelay(true) {
                                    tracing::debug!(%error, "simulated provider could not set TCP_NODELAY");
                                }
                                let stream = CutStream::new(tcp, self.cut.subscribe(), Arc::clone(&self.shared));
                                return (stream, remote);
                            }
                            Err(error) => accept_failed(error).await,
                        },
                        _ = refusal => {}
                        _ = changed(&mut self.changes) => {}
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// Waits for the next change; never returns if the sender is gone.
async fn changed(changes: &mut watch::Receiver<()>) {
    if changes.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Errors of one connection are the client's business; others (out of file
/// descriptors) get a pause, as axum's own listener does.
async fn accept_failed(error: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if !matches!(
        error.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        tracing::error!(%error, "simulated provider cannot accept a connection");
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// An accepted connection that fails every read and write once the
/// listener starts a refusal.
pub(crate) struct CutStream {
    tcp: TcpStream,
    cut: Pin<Box<dyn Future<Output = ()> + Send>>,
    is_cut: bool,
    shared: Arc<Shared>,
}

impl CutStream {
    fn new(tcp: TcpStream, mut generation: watch::Receiver<u64>, shared: Arc<Shared>) -> Self {
        let cut = Box::pin(async move {
            // A dropped sender means the server is shutting down gracefully:
            // that is not a cut.
            if generation.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        });
        CutStream {
            tcp,
            cut,
            is_cut: false,
            shared,
        }
    }

    /// Whether the connection is cut; registers the waker otherwise, so an
    /// idle connection learns of the cut at once.
    fn poll_cut(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.is_cut && self.cut.as_mut().poll(cx).is_ready() {
            self.is_cut = true;
            self.shared.count_dropped_connection();
        }
        self.is_cut
    }
}

fn cut_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        "connection dropped by a simulated refuse fault",
    )
}

impl AsyncRead for CutStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.poll_cut(cx) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for CutStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.poll_cut(cx) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut this.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.poll_cut(cx) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}
