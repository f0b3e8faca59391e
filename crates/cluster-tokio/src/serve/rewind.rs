//! An IO that gives some bytes already read before the socket's own: the unread bytes of a
//! connection handed back by another worker, and those read to tell HTTP/2 from HTTP/1.1.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `io`, read after `prefix[pos..]`.
#[derive(Debug)]
pub(crate) struct Rewind<Io> {
    prefix: Vec<u8>,
    pos: usize,
    io: Io,
}

impl<Io> Rewind<Io> {
    pub(crate) fn new(io: Io, prefix: Vec<u8>) -> Self {
        Self { prefix, pos: 0, io }
    }

    /// The bytes not given out yet, and the socket.
    pub(crate) fn into_parts(mut self) -> (Io, Vec<u8>) {
        self.prefix.drain(..self.pos);
        (self.io, self.prefix)
    }

    /// The bytes held, given out or not.
    pub(crate) fn prefix(&self) -> &[u8] {
        &self.prefix
    }
}

impl<Io: AsyncRead + Unpin> Rewind<Io> {
    /// Reads more of the socket into the prefix (nothing is given out yet): `Ok(0)` at its end.
    pub(crate) async fn read_more(&mut self) -> io::Result<usize> {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0; 1024];
        let n = self.io.read(&mut chunk).await?;
        self.prefix.extend_from_slice(&chunk[..n]);
        Ok(n)
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Rewind<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let rest = &self.prefix[self.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Rewind<Io> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn the_prefix_comes_first_then_the_socket() {
        let (mut near, far) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut near, b"T / HTTP/1.1\r\n")
            .await
            .unwrap();
        drop(near);
        let mut io = Rewind::new(far, b"GE".to_vec());
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn what_was_not_given_out_comes_back() {
        let (_near, far) = tokio::io::duplex(64);
        let mut io = Rewind::new(far, b"abcdef".to_vec());
        let mut two = [0; 2];
        io.read_exact(&mut two).await.unwrap();
        let (_, rest) = io.into_parts();
        assert_eq!(rest, b"cdef");
    }
}
