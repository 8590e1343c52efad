//! Per-thread memos of pure functions over short byte strings: a hot
//! URL's key is hashed once per thread, not once per request.
//!
//! A memo is only for a function of its inputs alone, so that a remembered
//! value is exactly the value a fresh call would give: the memo compares
//! the whole prefix and material it was given, never a hash of them.
//!
//! Bounded: a fixed number of slots per thread, direct-mapped (a new value
//! replaces the one in its slot), and only material up to
//! [`MAX_MATERIAL`] bytes is remembered. A slot holds its prefix, its
//! material and its value.

use std::cell::RefCell;
use std::thread::LocalKey;

/// Longest material remembered, in bytes; longer is computed each time.
pub(crate) const MAX_MATERIAL: usize = 256;

/// One thread's memo of `V`s, by prefix and material.
pub(crate) struct Recent<V> {
    slots: Vec<Option<Slot<V>>>,
    capacity: usize,
}

struct Slot<V> {
    prefix: Box<str>,
    material: Box<[u8]>,
    value: V,
}

impl<V: Clone> Recent<V> {
    /// An empty memo of `capacity` slots (allocated on first use).
    pub(crate) const fn new(capacity: usize) -> Self {
        Recent {
            slots: Vec::new(),
            capacity,
        }
    }

    fn get(&self, index: usize, prefix: &str, material: &[u8]) -> Option<V> {
        let slot = self.slots.get(index)?.as_ref()?;
        (*slot.prefix == *prefix && *slot.material == *material).then(|| slot.value.clone())
    }

    fn put(&mut self, index: usize, prefix: &str, material: &[u8], value: V) {
        if self.slots.is_empty() {
            self.slots.resize_with(self.capacity, || None);
        }
        if let Some(slot) = self.slots.get_mut(index) {
            *slot = Some(Slot {
                prefix: prefix.into(),
                material: material.into(),
                value,
            });
        }
    }
}

/// The value of `prefix` and `material` in this thread's `memo`:
/// remembered, or made by `make` and remembered. `make` must be a function
/// of `prefix` and `material` alone.
pub(crate) fn get_or_make<V: Clone + 'static>(
    memo: &'static LocalKey<RefCell<Recent<V>>>,
    prefix: &str,
    material: &[u8],
    make: impl FnOnce() -> V,
) -> V {
    if material.len() > MAX_MATERIAL {
        return make();
    }
    let hash = hash_of(prefix, material);
    let remembered = memo
        .try_with(|recent| {
            let recent = recent.try_borrow().ok()?;
            recent.get(slot_of(hash, recent.capacity), prefix, material)
        })
        .ok()
        .flatten();
    if let Some(value) = remembered {
        return value;
    }
    let value = make();
    // A thread being torn down, or a borrow held above this call (there is
    // none), only means the value is not remembered.
    let _ = memo.try_with(|recent| {
        if let Ok(mut recent) = recent.try_borrow_mut() {
            let index = slot_of(hash, recent.capacity);
            recent.put(index, prefix, material, value.clone());
        }
    });
    value
}

fn slot_of(hash: u64, capacity: usize) -> usize {
    (hash >> 32) as usize % capacity.max(1)
}

/// A multiply-rotate hash of eight bytes at a time (no secret needed: a
/// collision costs one call of the function).
fn hash_of(prefix: &str, material: &[u8]) -> u64 {
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
    hash
}

fn mix(hash: u64, word: u64) -> u64 {
    (hash.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const SLOTS: usize = 16;

    thread_local! {
        static MEMO: RefCell<Recent<String>> = const { RefCell::new(Recent::new(SLOTS)) };
    }

    fn counting<'a>(calls: &'a Cell<u32>, value: &'a str) -> impl FnOnce() -> String + 'a {
        move || {
            calls.set(calls.get() + 1);
            value.to_owned()
        }
    }

    fn get(prefix: &str, material: &[u8], make: impl FnOnce() -> String) -> String {
        get_or_make(&MEMO, prefix, material, make)
    }

    #[test]
    fn a_remembered_value_is_made_once() {
        let calls = Cell::new(0);
        for _ in 0..3 {
            assert_eq!(get("tf:", b"material one", counting(&calls, "v1")), "v1");
        }
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn prefix_and_material_must_both_match() {
        let calls = Cell::new(0);
        let a = get("a:", b"same", counting(&calls, "a"));
        let b = get("b:", b"same", counting(&calls, "b"));
        let c = get("a:", b"same!", counting(&calls, "c"));
        assert_eq!((a.as_str(), b.as_str(), c.as_str()), ("a", "b", "c"));
        assert_eq!(get("a:", b"same", || "made again".into()), "a");
        assert_eq!(calls.get(), 3);
    }

    #[test]
    fn colliding_values_replace_each_other_and_stay_correct() {
        // More values than slots: every answer is still its own.
        for round in 0..2 {
            for i in 0..(SLOTS * 5) {
                let material = format!("material {i}");
                let want = format!("value {i}");
                let got = get("tf:", material.as_bytes(), || want.clone());
                assert_eq!(got, want, "round {round}");
            }
        }
        let slots = MEMO.with(|memo| memo.borrow().slots.len());
        assert_eq!(slots, SLOTS, "the memo stays bounded");
    }

    #[test]
    fn long_material_is_not_remembered() {
        let calls = Cell::new(0);
        let long = vec![7u8; MAX_MATERIAL + 1];
        for _ in 0..2 {
            get("tf:", &long, counting(&calls, "long"));
        }
        assert_eq!(calls.get(), 2);
    }
}
