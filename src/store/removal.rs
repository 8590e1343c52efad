//! What the Redis stores do with the keys an invalidation selects: delete
//! them, or (a soft purge) delete the leases and mark the entries stale in
//! place with `mark_stale.lua`.

use std::sync::LazyLock;

use bb8_redis::redis::{self, Script};

/// Lowers an entry's fresh-until field in place; deletes a lease.
pub(super) static MARK_STALE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/mark_stale.lua")));

/// How the selected keys go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Removal {
    /// `UNLINK` them (and take them out of the set they were read from).
    Delete,
    /// Delete the leases (out of the set too); mark the entries stale from
    /// `at_ms` on (they stay in the set).
    MarkStale { at_ms: u64 },
}

impl Removal {
    /// The `mark_stale.lua` call for `key`.
    pub(super) fn mark_stale(key: &str, at_ms: u64) -> redis::ScriptInvocation<'static> {
        let mut invocation = MARK_STALE.prepare_invoke();
        invocation
            .key(key)
            .arg(at_ms)
            .arg(&crate::entry::ENTRY_HEAD[..]);
        invocation
    }
}
