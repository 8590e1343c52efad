//! A record as a store that keeps it in process holds it: its bytes and,
//! made once when it was stored, what the layer decodes it into.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use crate::entry::Record;

/// Bytes counted for a decoded record's own parts besides each header field
/// (its struct, the header map's index table, the box around it).
const DECODED_OVERHEAD_BYTES: usize = 256;

/// Bytes counted per header field of a decoded record (a map bucket with its
/// name and value handles, about 100 bytes, and its index slot); the
/// values' bytes themselves are the record's, shared.
const DECODED_FIELD_BYTES: usize = 128;

/// A record a store answers with at once ([`Store::get_held_now`]).
///
/// Its bytes are what [`Store::get`] returns. The stores of this crate that
/// keep records in process ([`MemoryStore`], the local tier of
/// [`FenceLayerBuilder::local_tier`]) also keep the record decoded, made
/// once when it was stored: a hit on it then copies the decoded response
/// (reference counts to the same checked names and values) instead of
/// parsing and checking every header field again. A store outside this crate
/// answers with [`HeldRecord::new`], bytes alone, and the layer decodes them
/// on each read as it does for [`Store::get`].
///
/// [`Store::get_held_now`]: super::Store::get_held_now
/// [`Store::get`]: super::Store::get
/// [`MemoryStore`]: super::MemoryStore
/// [`FenceLayerBuilder::local_tier`]: crate::FenceLayerBuilder::local_tier
///
/// ```
/// use bytes::Bytes;
/// use tower_fence::store::HeldRecord;
///
/// let held = HeldRecord::new(Bytes::from_static(b"record"));
/// assert_eq!(held.bytes(), &Bytes::from_static(b"record"));
/// assert_eq!(held.into_bytes(), Bytes::from_static(b"record"));
/// ```
#[derive(Clone)]
pub struct HeldRecord {
    bytes: Bytes,
    /// `Some` when the bytes decoded, for the key they were stored under,
    /// when they were stored.
    decoded: Option<Arc<Record>>,
}

impl HeldRecord {
    /// A record held as bytes alone.
    pub fn new(bytes: Bytes) -> Self {
        HeldRecord {
            bytes,
            decoded: None,
        }
    }

    /// `bytes`, stored under `key`, decoded now when they are a record of
    /// this codec written for `key`. Bytes that do not decode are held
    /// alone: each read then decodes them and meets their error as a read
    /// from a remote store would.
    pub(crate) fn decoding(key: &str, bytes: Bytes) -> Self {
        let decoded = Record::decode(&bytes, key).ok().map(Arc::new);
        HeldRecord { bytes, decoded }
    }

    /// The record's bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The record's bytes, owned.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// The record decoded when it was stored, if it decoded.
    pub(crate) fn decoded(&self) -> Option<&Record> {
        self.decoded.as_deref()
    }

    /// Bytes it holds, for a store bounded by bytes: the record's, and
    /// an estimate of what its decoded form adds (see
    /// [`DECODED_FIELD_BYTES`]).
    pub(crate) fn weight(&self) -> usize {
        let decoded = match self.decoded.as_deref() {
            None => 0,
            Some(Record::Vary(names)) => DECODED_OVERHEAD_BYTES + names.len() * DECODED_FIELD_BYTES,
            Some(Record::Entry(entry)) => {
                let fields = entry.headers.capacity()
                    + entry.trailers.as_ref().map_or(0, |t| t.capacity())
                    + entry.vary.len();
                DECODED_OVERHEAD_BYTES + fields * DECODED_FIELD_BYTES
            }
        };
        self.bytes.len() + decoded
    }
}

impl fmt::Debug for HeldRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldRecord")
            .field("bytes", &self.bytes.len())
            .field("decoded", &self.decoded.is_some())
            .finish()
    }
}

impl From<Bytes> for HeldRecord {
    fn from(bytes: Bytes) -> Self {
        HeldRecord::new(bytes)
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

    use super::*;
    use crate::entry::Entry;

    fn entry() -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.insert("x-custom", HeaderValue::from_static("1"));
        Entry {
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(b"body"),
            trailers: None,
            stored_at_ms: 1_000,
            fresh_until_ms: 61_000,
            stale_until_ms: 61_000,
            error_until_ms: 61_000,
            rebuild_ms: 1,
            flags: 0,
            vary: Vec::new(),
        }
    }

    #[test]
    fn a_record_decodes_once_to_what_a_read_decodes() {
        let bytes = entry().encode("k");
        let held = HeldRecord::decoding("k", bytes.clone());
        assert_eq!(held.bytes(), &bytes);
        assert_eq!(held.decoded(), Some(&Record::decode(&bytes, "k").unwrap()));

        let names = [HeaderName::from_static("accept-language")];
        let stub = Record::encode_vary(&names, "k");
        let held = HeldRecord::decoding("k", stub.clone());
        assert_eq!(held.decoded(), Some(&Record::Vary(names.to_vec())));
        assert!(held.weight() > stub.len());
    }

    #[test]
    fn bytes_that_do_not_decode_for_their_key_are_held_alone() {
        let bytes = entry().encode("k");
        // Written for another key: never decoded for this one.
        let other = HeldRecord::decoding("other", bytes.clone());
        assert!(other.decoded().is_none());
        assert_eq!(other.weight(), bytes.len());
        // Not a record at all, and truncated.
        assert!(HeldRecord::decoding("k", Bytes::from_static(b"v"))
            .decoded()
            .is_none());
        let cut = bytes.slice(..bytes.len() - 1);
        assert!(HeldRecord::decoding("k", cut).decoded().is_none());
        // From a store outside the crate: bytes alone.
        assert!(HeldRecord::new(bytes).decoded().is_none());
    }
}
