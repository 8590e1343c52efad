//! The keys this thread derived last, so that a hot URL's SHA-256 is taken
//! once per thread, not once per request.
//!
//! A key is a pure function of its prefix (the namespace, or a variant's
//! base key) and the bytes its hash is taken over (its *material*), so a
//! remembered key is exactly the key a fresh derivation would give: the
//! memo compares the whole prefix and material, never a hash of them.
//!
//! Bounded: [`SLOTS`] slots per thread, direct-mapped (a new key replaces
//! the one in its slot), and only material up to [`MAX_MATERIAL`] bytes is
//! remembered. A slot holds at most its prefix, its material and the key.

use std::cell::RefCell;
use std::sync::Arc;

/// Slots per thread.
const SLOTS: usize = 256;

/// Longest material remembered, in bytes; longer keys are derived each
/// time.
pub(crate) const MAX_MATERIAL: usize = 256;

struct Slot {
    prefix: Box<str>,
    material: Box<[u8]>,
    key: Arc<str>,
}

thread_local! {
    static RECENT: RefCell<Vec<Option<Slot>>> = const { RefCell::new(Vec::new()) };
}

/// The key of `prefix` and `material`: remembered, or made by `derive` and
/// remembered.
pub(crate) fn get_or_derive(
    prefix: &str,
    material: &[u8],
    derive: impl FnOnce() -> Arc<str>,
) -> Arc<str> {
    if material.len() > MAX_MATERIAL {
        return derive();
    }
    let index = slot_of(prefix, material);
    let remembered = RECENT
        .try_with(|recent| {
            let recent = recent.try_borrow().ok()?;
            let slot = recent.get(index)?.as_ref()?;
            (*slot.prefix == *prefix && *slot.material == *material).then(|| slot.key.clone())
        })
        .ok()
        .flatten();
    if let Some(key) = remembered {
        return key;
    }
    let key = derive();
    // A thread being torn down, or a borrow held above this call (there is
    // none), only means the key is not remembered.
    let _ = RECENT.try_with(|recent| {
        if let Ok(mut recent) = recent.try_borrow_mut() {
            if recent.is_empty() {
                recent.resize_with(SLOTS, || None);
            }
            recent[index] = Some(Slot {
                prefix: prefix.into(),
                material: material.into(),
                key: key.clone(),
            });
        }
    });
    key
}

/// The slot of a prefix and material: a multiply-rotate hash of eight
/// bytes at a time (no secret needed: a collision costs one derivation).
fn slot_of(prefix: &str, material: &[u8]) -> usize {
    let mut hash: u64 = 0;
    for bytes in [prefix.as_bytes(), material] {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut eight = [0u8; 8];
            eight.copy_from_slice(word);
            hash = mix(hash, u64::from_le_bytes(eight));
        }
        let mut tail = [0u8; 8];
        tail[..words.remainder().len()].copy_from_slice(words.remainder());
        hash = mix(hash, u64::from_le_bytes(tail) ^ bytes.len() as u64);
    }
    (hash >> 56) as usize % SLOTS
}

fn mix(hash: u64, word: u64) -> u64 {
    (hash.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn derive_counting<'a>(calls: &'a Cell<u32>, key: &'a str) -> impl FnOnce() -> Arc<str> + 'a {
        move || {
            calls.set(calls.get() + 1);
            Arc::from(key)
        }
    }

    #[test]
    fn a_remembered_key_is_derived_once() {
        let calls = Cell::new(0);
        for _ in 0..3 {
            let key = get_or_derive("tf:", b"material one", derive_counting(&calls, "k1"));
            assert_eq!(&*key, "k1");
        }
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn prefix_and_material_must_both_match() {
        let calls = Cell::new(0);
        let a = get_or_derive("a:", b"same", derive_counting(&calls, "a"));
        let b = get_or_derive("b:", b"same", derive_counting(&calls, "b"));
        let c = get_or_derive("a:", b"same!", derive_counting(&calls, "c"));
        assert_eq!((&*a, &*b, &*c), ("a", "b", "c"));
        assert_eq!(get_or_derive("a:", b"same", || unreachable!()).as_ref(), "a");
        assert_eq!(calls.get(), 3);
    }

    #[test]
    fn colliding_keys_replace_each_other_and_stay_correct() {
        // More keys than slots: every answer is still its own key.
        for round in 0..2 {
            for i in 0..(SLOTS * 3) {
                let material = format!("material {i}");
                let want = format!("key {i}");
                let got = get_or_derive("tf:", material.as_bytes(), || Arc::from(want.as_str()));
                assert_eq!(&*got, want, "round {round}");
            }
        }
        let slots = RECENT.with(|recent| recent.borrow().len());
        assert_eq!(slots, SLOTS, "the memo stays bounded");
    }

    #[test]
    fn long_material_is_not_remembered() {
        let calls = Cell::new(0);
        let long = vec![7u8; MAX_MATERIAL + 1];
        for _ in 0..2 {
            get_or_derive("tf:", &long, derive_counting(&calls, "long"));
        }
        assert_eq!(calls.get(), 2);
    }
}
