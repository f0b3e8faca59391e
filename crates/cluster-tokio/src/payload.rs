//! User messages: any serde value, postcard-encoded, at most one frame.

use std::io;

use proto::wire::MAX_PAYLOAD;
use serde::Serialize;

/// Encodes `value` for a `Message` frame, refusing it before anything is sent if it does not
/// fit in one.
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> io::Result<Vec<u8>> {
    let payload = postcard::to_stdvec(value).map_err(io::Error::other)?;
    if payload.len() > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "message of {} bytes exceeds the {MAX_PAYLOAD}-byte limit of one frame",
                payload.len()
            ),
        ));
    }
    Ok(payload)
}
