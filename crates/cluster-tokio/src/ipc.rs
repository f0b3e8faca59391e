//! One end of a primary–worker link: datagrams of at most [`proto::wire::MAX_FRAME`] bytes, each
//! with its file descriptors (SCM_RIGHTS), over a `SOCK_SEQPACKET` socket pair.
//!
//! The socket is registered with the reactor for readability only. Registered for writability
//! too (as `tokio_seqpacket::UnixSeqpacket` does), every datagram the peer reads would raise a
//! writable edge here and wake this side for nothing: on the hot path the primary sends a
//! connection and the worker acks it, so each side would be woken once more per connection.
//! Sends are tried directly; only a send that finds the socket full registers a second handle
//! of the socket for writability, until a send goes through.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::task::{Context, Poll, ready};

use proto::wire::MAX_FRAME;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::sys;

/// What one received datagram was.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Received {
    /// A frame of `len` bytes (in the buffer) with its fds.
    Frame { len: usize },
    /// The frame or its fds did not fit: a protocol error by the peer.
    Truncated,
    /// The peer closed its end.
    Closed,
}

/// What a received datagram (or the failure to receive one) means for the link.
fn classify(datagram: io::Result<sys::Datagram>, fds: &[OwnedFd]) -> io::Result<Received> {
    let datagram = match datagram {
        Ok(datagram) => datagram,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(Received::Closed),
        Err(e) => return Err(e),
    };
    Ok(match datagram {
        sys::Datagram {
            truncated: true, ..
        } => Received::Truncated,
        sys::Datagram { len, .. } if len > MAX_FRAME => Received::Truncated,
        sys::Datagram { len: 0, .. } if fds.is_empty() => Received::Closed,
        sys::Datagram { len, .. } => Received::Frame { len },
    })
}

/// A link socket with its receive buffer.
#[derive(Debug)]
pub(crate) struct Channel {
    socket: AsyncFd<OwnedFd>,
    /// A duplicate of `socket` registered for writability, only while a send waits for room.
    room: Option<AsyncFd<OwnedFd>>,
    buf: Vec<u8>,
}

impl Channel {
    /// Takes over a connected `SOCK_SEQPACKET` socket (made non-blocking here).
    pub(crate) fn new(socket: OwnedFd) -> io::Result<Self> {
        socket2::SockRef::from(&socket).set_nonblocking(true)?;
        Ok(Self {
            socket: sys::register(socket, Interest::READABLE)?,
            room: None,
            // One byte more than a frame may have, so an oversized datagram shows as truncated.
            buf: vec![0; MAX_FRAME + 1],
        })
    }

    /// The frame last received.
    pub(crate) fn frame(&self, len: usize) -> &[u8] {
        &self.buf[..len]
    }

    /// Receives one datagram; its fds are appended to `fds`.
    pub(crate) fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        fds: &mut Vec<OwnedFd>,
    ) -> Poll<io::Result<Received>> {
        let datagram = loop {
            let mut ready = ready!(self.socket.poll_read_ready(cx))?;
            match ready.try_io(|socket| sys::recv_frame(socket.as_fd(), &mut self.buf, fds)) {
                Ok(result) => break result,
                // Nothing left: readiness is cleared, poll again to wait.
                Err(_would_block) => {}
            }
        };
        Poll::Ready(classify(datagram, fds))
    }

    /// Receives one datagram if one waits, without the reactor: for reading a link to its end
    /// once its worker is gone.
    pub(crate) fn try_recv(&mut self, fds: &mut Vec<OwnedFd>) -> io::Result<Option<Received>> {
        match sys::recv_frame(self.socket.get_ref().as_fd(), &mut self.buf, fds) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            datagram => classify(datagram, fds).map(Some),
        }
    }

    pub(crate) async fn recv(&mut self, fds: &mut Vec<OwnedFd>) -> io::Result<Received> {
        std::future::poll_fn(|cx| self.poll_recv(cx, fds)).await
    }

    /// Sends one frame with at most one fd.
    pub(crate) fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        frame: &[u8],
        fd: Option<BorrowedFd<'_>>,
    ) -> Poll<io::Result<()>> {
        let send = |socket: BorrowedFd<'_>| sys::send_frame(socket, frame, fd);
        let sent = loop {
            let Some(room) = &self.room else {
                match send(self.socket.get_ref().as_fd()) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Registering reports the current state, so room that appeared since
                        // the failed send is not missed.
                        let duplicate = self.socket.get_ref().try_clone()?;
                        self.room = Some(sys::register(duplicate, Interest::WRITABLE)?);
                        continue;
                    }
                    result => break result,
                }
            };
            let mut ready = ready!(room.poll_write_ready(cx))?;
            if let Ok(result) = ready.try_io(|socket| send(socket.as_fd())) {
                self.room = None;
                break result;
            }
        };
        if sent? != frame.len() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short seqpacket send",
            )));
        }
        Poll::Ready(Ok(()))
    }

    pub(crate) async fn send(
        &mut self,
        frame: &[u8],
        fd: Option<BorrowedFd<'_>>,
    ) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_send(cx, frame, fd)).await
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::os::fd::AsFd;

    use tokio_seqpacket::UnixSeqpacket;

    use super::*;

    fn pair() -> (Channel, Channel) {
        let (a, b) = UnixSeqpacket::pair().unwrap();
        (
            Channel::new(a.into()).unwrap(),
            Channel::new(b.into()).unwrap(),
        )
    }

    #[tokio::test]
    async fn frames_and_fds_cross_and_eof_is_seen() {
        let (mut a, mut b) = pair();
        let file = std::fs::File::open("/dev/null").unwrap();
        a.send(&[1, 2, 3], Some(file.as_fd())).await.unwrap();
        let mut fds = Vec::new();
        assert_eq!(b.recv(&mut fds).await.unwrap(), Received::Frame { len: 3 });
        assert_eq!(b.frame(3), [1, 2, 3]);
        assert_eq!(fds.len(), 1);
        drop(a);
        fds.clear();
        assert_eq!(b.recv(&mut fds).await.unwrap(), Received::Closed);
    }

    #[tokio::test]
    async fn oversized_datagram_is_reported_truncated() {
        let (a, b) = UnixSeqpacket::pair().unwrap();
        let mut b = Channel::new(b.into()).unwrap();
        a.send(&vec![7; MAX_FRAME + 10]).await.unwrap();
        assert_eq!(b.recv(&mut Vec::new()).await.unwrap(), Received::Truncated);
    }

    /// A send that finds the peer's queue full waits for room and goes through once the peer
    /// reads, in order, with its fd; the writability registration is dropped afterwards.
    #[tokio::test]
    async fn a_send_on_a_full_socket_waits_for_room() {
        let (mut a, mut b) = pair();
        let frame = vec![9; 64 * 1024];
        let mut queued = 0;
        loop {
            match sys::send_frame(a.socket.get_ref().as_fd(), &frame, None) {
                Ok(_) => queued += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(queued > 0);
        let file = std::fs::File::open("/dev/null").unwrap();
        let mut send = Box::pin(a.send(&[1, 2], Some(file.as_fd())));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(
            send.as_mut().poll(&mut cx).is_pending(),
            "the socket is full"
        );
        let reader = async {
            let mut fds = Vec::new();
            for _ in 0..queued {
                let received = b.recv(&mut fds).await.unwrap();
                assert_eq!(received, Received::Frame { len: frame.len() });
            }
            assert!(fds.is_empty());
            assert_eq!(b.recv(&mut fds).await.unwrap(), Received::Frame { len: 2 });
            assert_eq!(fds.len(), 1);
        };
        let (sent, ()) = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            tokio::join!(send, reader)
        })
        .await
        .expect("the send went through once the peer read");
        sent.unwrap();
        assert!(a.room.is_none());
    }
}
