//! One end of a primary–worker link: datagrams of at most [`proto::wire::MAX_FRAME`] bytes, each
//! with its file descriptors (SCM_RIGHTS), over a `SOCK_SEQPACKET` socket pair.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::task::{Context, Poll, ready};

use proto::wire::MAX_FRAME;
use tokio_seqpacket::UnixSeqpacket;
use tokio_seqpacket::ancillary::{AncillaryMessageWriter, OwnedAncillaryMessage};

/// Room for the control message of a few fds, 8-byte aligned as `cmsghdr` requires.
#[repr(C, align(8))]
struct ControlBuffer([u8; 128]);

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

/// A link socket with its receive buffers.
#[derive(Debug)]
pub(crate) struct Channel {
    socket: UnixSeqpacket,
    buf: Vec<u8>,
}

impl Channel {
    pub(crate) fn new(socket: UnixSeqpacket) -> Self {
        // One byte more than a frame may have, so an oversized datagram shows as truncated.
        Self {
            socket,
            buf: vec![0; MAX_FRAME + 1],
        }
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
        let mut control = ControlBuffer([0; 128]);
        let (info, ancillary) = match ready!(self.socket.poll_recv_vectored_with_ancillary(
            cx,
            &mut [IoSliceMut::new(&mut self.buf)],
            &mut control.0,
        )) {
            Ok(received) => received,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Poll::Ready(Ok(Received::Closed));
            }
            Err(e) => return Poll::Ready(Err(e)),
        };
        let len = info.bytes_read();
        let truncated = info.truncated() || info.ancillary_truncated() || len > MAX_FRAME;
        for message in ancillary.into_messages() {
            if let OwnedAncillaryMessage::FileDescriptors(received) = message {
                fds.extend(received);
            }
        }
        Poll::Ready(Ok(match (len, truncated) {
            (_, true) => Received::Truncated,
            (0, false) if fds.is_empty() => Received::Closed,
            _ => Received::Frame { len },
        }))
    }

    pub(crate) async fn recv(&mut self, fds: &mut Vec<OwnedFd>) -> io::Result<Received> {
        std::future::poll_fn(|cx| self.poll_recv(cx, fds)).await
    }

    /// Sends one frame with at most one fd.
    pub(crate) fn poll_send(
        &self,
        cx: &mut Context<'_>,
        frame: &[u8],
        fd: Option<BorrowedFd<'_>>,
    ) -> Poll<io::Result<()>> {
        let mut control = ControlBuffer([0; 128]);
        let mut writer = AncillaryMessageWriter::new(&mut control.0);
        if let Some(fd) = fd {
            writer.add_fds([fd])?;
        }
        let sent = ready!(self.socket.poll_send_vectored_with_ancillary(
            cx,
            &[IoSlice::new(frame)],
            &mut writer
        ))?;
        if sent != frame.len() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short seqpacket send",
            )));
        }
        Poll::Ready(Ok(()))
    }

    pub(crate) async fn send(&self, frame: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_send(cx, frame, fd)).await
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[tokio::test]
    async fn frames_and_fds_cross_and_eof_is_seen() {
        let (a, b) = UnixSeqpacket::pair().unwrap();
        let (a, mut b) = (Channel::new(a), Channel::new(b));
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
        let mut b = Channel::new(b);
        a.send(&vec![7; MAX_FRAME + 10]).await.unwrap();
        assert_eq!(b.recv(&mut Vec::new()).await.unwrap(), Received::Truncated);
    }
}
