//! Typed messages between the primary and its workers, both directions alike: fire-and-forget
//! messages (maybe carrying an fd) and requests answered by one reply.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use proto::Seq;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

/// The largest message, encoded: 16 MiB (larger than one frame is fine: it is split).
pub const MAX_MESSAGE: usize = proto::user::MAX_MESSAGE;

/// A refusal's reason is cut to this many bytes, so that a refusal always fits in one frame.
const MAX_REASON: usize = 4096;

/// How long [`Worker::request`](crate::Worker::request) and
/// [`WorkerHandle::request`](crate::primary::WorkerHandle::request) wait for a reply.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Encodes a user value with postcard, refusing it before anything is sent if it is over the
/// protocol's limit ([`MAX_MESSAGE`], 16 MiB; larger than one frame is fine: it is split).
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> io::Result<Vec<u8>> {
    let payload =
        postcard::to_stdvec(value).map_err(|e| EncodeError::Unencodable(e.to_string()))?;
    if payload.len() > MAX_MESSAGE {
        return Err(EncodeError::TooLarge {
            len: payload.len(),
            max: MAX_MESSAGE,
        }
        .into());
    }
    Ok(payload)
}

/// A value that cannot be sent; nothing was. Sends return it inside an [`io::Error`] of kind
/// `InvalidInput` (`error.get_ref()` and `downcast_ref::<EncodeError>()` to tell which).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// serde could not encode it (a serializer that returned an error, a map of unknown length).
    #[error("message cannot be encoded: {0}")]
    Unencodable(String),
    /// It is larger than the largest message.
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Its encoded size.
        len: usize,
        /// [`MAX_MESSAGE`].
        max: usize,
    },
}

impl From<EncodeError> for io::Error {
    fn from(error: EncodeError) -> Self {
        Self::new(io::ErrorKind::InvalidInput, error)
    }
}

/// Decodes a whole payload as `T`; bytes left over mean it was not a `T`.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    match postcard::take_from_bytes(bytes).map_err(DecodeError)? {
        (value, []) => Ok(value),
        _ => Err(DecodeError(postcard::Error::DeserializeBadEncoding)),
    }
}

/// A message that is not a value of the type asked for (its bytes do not decode as one, or
/// are one followed by more bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(postcard::Error);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the message is not a value of the type asked for: {}",
            self.0
        )
    }
}

impl std::error::Error for DecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl From<DecodeError> for io::Error {
    fn from(error: DecodeError) -> Self {
        Self::new(io::ErrorKind::InvalidData, error)
    }
}

pub(crate) use proto::Answer;

/// Sends an [`Answer`] back over the link the request came on.
pub(crate) type Responder = Box<dyn FnOnce(Answer) -> io::Result<()> + Send>;

/// A message or request from the other side of the link: a postcard-encoded value, maybe with a
/// file descriptor (a socket sent along with it).
///
/// It owns its fd and its reply: one [`take_fd`](Self::take_fd) gets the fd, one
/// [`reply`](Self::reply) answers, and dropping it closes an fd nobody took. A request dropped
/// unanswered is answered with a refusal, so the requester learns at once instead of at its
/// timeout.
pub struct Message {
    payload: Vec<u8>,
    fd: Option<OwnedFd>,
    responder: Option<Responder>,
}

impl Drop for Message {
    fn drop(&mut self) {
        if let Some(responder) = self.responder.take() {
            let _ = responder(Answer::Refusal(
                "the request was dropped without a reply".into(),
            ));
        }
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("len", &self.payload.len())
            .field("fd", &self.fd.is_some())
            .field("request", &self.is_request())
            .finish()
    }
}

impl Message {
    pub(crate) fn new(payload: Vec<u8>, fd: Option<OwnedFd>, responder: Option<Responder>) -> Self {
        Self {
            payload,
            fd,
            responder,
        }
    }

    /// Decodes the value as `T` (the type the other side sent).
    ///
    /// # Errors
    ///
    /// The bytes are not a `T`, or are a `T` followed by more bytes. postcard does not describe
    /// types on the wire, so a value of another type that happens to decode as a `T` is not
    /// always detected: both sides must agree on the type (a shared enum is the usual way).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        decode(&self.payload)
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.payload
    }

    /// Takes the file descriptor sent with the message, if any (once).
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fd.take()
    }

    /// Takes the fd sent with the message as a Tokio `TcpStream`.
    ///
    /// # Errors
    ///
    /// No fd came with the message (`NotFound`), or it is not a TCP socket (`InvalidData`; the
    /// fd is closed).
    pub fn take_tcp_stream(&mut self) -> io::Result<tokio::net::TcpStream> {
        let socket = self.take_ip_socket(socket2::Type::STREAM)?;
        tokio::net::TcpStream::from_std(socket.into())
    }

    /// Takes the fd sent with the message as a Tokio `UdpSocket`.
    ///
    /// # Errors
    ///
    /// As [`Self::take_tcp_stream`], for a UDP socket.
    pub fn take_udp_socket(&mut self) -> io::Result<tokio::net::UdpSocket> {
        let socket = self.take_ip_socket(socket2::Type::DGRAM)?;
        tokio::net::UdpSocket::from_std(socket.into())
    }

    fn take_ip_socket(&mut self, ty: socket2::Type) -> io::Result<socket2::Socket> {
        let fd = self
            .take_fd()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no fd came with it"))?;
        let socket = socket2::Socket::from(fd);
        let is_ip = matches!(socket.domain(), Ok(d) if d == socket2::Domain::IPV4 || d == socket2::Domain::IPV6);
        if socket.r#type().ok() != Some(ty) || !is_ip {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the fd is not a socket of that kind",
            ));
        }
        socket.set_nonblocking(true)?;
        Ok(socket)
    }

    /// Whether it is a request that still awaits its reply.
    pub fn is_request(&self) -> bool {
        self.responder.is_some()
    }

    /// Answers the request with `value`.
    ///
    /// # Errors
    ///
    /// It is not a request or was already answered (`InvalidInput`), `value` cannot be
    /// encoded or is over the size limit (`InvalidInput`), or the link closed (`NotConnected`).
    pub fn reply<R: Serialize + ?Sized>(&mut self, value: &R) -> io::Result<()> {
        let payload = encode(value)?;
        self.answer(Answer::Reply(payload))
    }

    /// Answers the request with a refusal; the requester gets [`RequestError::Refused`] with
    /// `reason`.
    ///
    /// # Errors
    ///
    /// As [`Self::reply`].
    pub fn refuse(&mut self, reason: impl fmt::Display) -> io::Result<()> {
        let mut reason = reason.to_string();
        if reason.len() > MAX_REASON {
            let mut end = MAX_REASON;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        self.answer(Answer::Refusal(reason))
    }

    fn answer(&mut self, answer: Answer) -> io::Result<()> {
        let responder = self.responder.take().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a request, or already answered",
            )
        })?;
        responder(answer)
    }
}

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No answer came in time (a late one is dropped).
    #[error("no reply within {}", crate::settings::Shown(*.0))]
    TimedOut(Duration),
    /// The other side refused it, or dropped it unanswered.
    #[error("request refused: {0}")]
    Refused(String),
    /// The link closed before an answer came (or was never open).
    #[error("the link closed before the reply came")]
    Disconnected,
    /// The request could not be encoded or is over the size limit; nothing was sent.
    #[error("request not sent")]
    Send(#[source] io::Error),
    /// The reply is not the type asked for.
    #[error("the reply is not the expected type")]
    Decode(#[source] DecodeError),
}

impl From<RequestError> for io::Error {
    fn from(error: RequestError) -> Self {
        let kind = match &error {
            RequestError::TimedOut(_) => io::ErrorKind::TimedOut,
            RequestError::Refused(_) => io::ErrorKind::ConnectionRefused,
            RequestError::Disconnected => io::ErrorKind::NotConnected,
            RequestError::Send(e) => e.kind(),
            RequestError::Decode(_) => io::ErrorKind::InvalidData,
        };
        Self::new(kind, error)
    }
}

pub(crate) type ReplySender = oneshot::Sender<Result<Vec<u8>, RequestError>>;

/// Who waits for the answers to the requests one side sent over one link, by the number the
/// core gave each request.
#[derive(Default)]
pub(crate) struct Waiters {
    waiting: HashMap<Seq, ReplySender>,
    /// Size after the last sweep of requests whose waiter gave up.
    swept_at: usize,
}

impl Waiters {
    /// Waits for the answer to request `seq`. Returns the requests whose waiter gave up (timed
    /// out) since the last sweep, for the core to forget.
    pub(crate) fn insert(&mut self, seq: Seq, reply: ReplySender) -> Vec<Seq> {
        let mut gone = Vec::new();
        if self.waiting.len() > 2 * self.swept_at.max(32) {
            self.waiting.retain(|seq, tx| {
                let closed = tx.is_closed();
                if closed {
                    gone.push(*seq);
                }
                !closed
            });
            self.swept_at = self.waiting.len();
        }
        self.waiting.insert(seq, reply);
        gone
    }

    /// The answer to request `seq` came; one nobody waits for any more (timed out) is dropped.
    pub(crate) fn answer(&mut self, seq: Seq, answer: Answer) {
        if let Some(tx) = self.waiting.remove(&seq) {
            let _ = tx.send(match answer {
                Answer::Reply(payload) => Ok(payload),
                Answer::Refusal(reason) => Err(RequestError::Refused(reason)),
            });
        }
    }
}

/// Waits for the answer to a request and decodes it.
pub(crate) async fn await_reply<R: DeserializeOwned>(
    rx: oneshot::Receiver<Result<Vec<u8>, RequestError>>,
    timeout: Duration,
) -> Result<R, RequestError> {
    let payload = tokio::time::timeout(timeout, rx)
        .await
        .map_err(|_| RequestError::TimedOut(timeout))?
        .map_err(|_| RequestError::Disconnected)??;
    decode(&payload).map_err(RequestError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_whose_waiter_gave_up_are_swept_for_the_core_to_forget() {
        let mut waiters = Waiters::default();
        let mut kept = Vec::new();
        for n in 1..=40 {
            let (tx, rx) = oneshot::channel();
            // Every other waiter gives up.
            if n % 2 == 0 {
                kept.push(rx);
            }
            assert_eq!(waiters.insert(Seq::new(n), tx), []);
        }
        let mut gone = Vec::new();
        for n in 41..=100 {
            let (tx, rx) = oneshot::channel();
            kept.push(rx);
            gone.extend(waiters.insert(Seq::new(n), tx));
        }
        let odd: Vec<Seq> = (1..=40).filter(|n| n % 2 == 1).map(Seq::new).collect();
        gone.sort_by_key(|seq| seq.get());
        assert_eq!(gone, odd);
        // The ones still waited for are answered.
        waiters.answer(Seq::new(2), Answer::Reply(vec![7]));
        assert_eq!(kept[0].try_recv().unwrap().unwrap(), vec![7]);
    }
}
