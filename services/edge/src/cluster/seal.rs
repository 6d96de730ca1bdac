//! Sealing and opening gossip datagrams: authentication, privacy and replay
//! protection with the cluster's gossip key.
//!
//! Every datagram chitchat sends is sealed with XChaCha20-Poly1305 under the
//! first key of the [`Keyring`]; a received one is opened with any key of the
//! ring (two keys are active while a key is rotated). Sealing hides what
//! gossip carries (node addresses, load) and the tag proves the datagram came
//! from a key holder and was not changed on the way.
//!
//! The wire format (all integers big-endian):
//!
//! ```text
//! 0      1          9           17            25                 len-16   len
//! | 0x01 | sender id | counter   | timestamp ms | ciphertext ...  | tag    |
//!         `------------- 24-byte XChaCha nonce ------------'
//! ```
//!
//! The 25-byte header is the associated data; its last 24 bytes are the
//! nonce, unique per key because the sender id is random per process (64
//! bits from the OS) and the counter never repeats within one process.
//!
//! Replay protection, applied only after the tag checked out so a forger
//! cannot poison it:
//! - the timestamp (the sender's wall clock) must be within the replay window
//!   of this node's clock, or the datagram is `stale`;
//! - within the window, each sender's counters are tracked with a sliding
//!   bitmap (as IPsec and WireGuard do): a counter seen before is `replayed`,
//!   one more than [`REORDER_WINDOW`] behind the newest is `stale`.
//!
//! A sender's record is kept for two windows after it was last heard, long
//! enough that any datagram it sent before is `stale` by then. What this
//! cannot catch: after this node restarts it holds no records, so a datagram
//! captured less than one window earlier is accepted once; it is a genuine,
//! recent datagram, and chitchat ignores state versions it already has.
//!
//! Everything here is pure (the clock is an argument), so the unit tests below
//! check each rule without sockets or sleeps.

use std::collections::HashMap;

use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::{AeadInPlace, OsRng};
use chacha20poly1305::{Key, KeyInit, Tag, XChaCha20Poly1305, XNonce};

/// Bytes in a gossip key (XChaCha20-Poly1305 takes 256-bit keys).
pub(crate) const KEY_LEN: usize = 32;

/// The format byte of a sealed datagram; a new layout gets a new value.
const FORMAT_V1: u8 = 0x01;
/// Format byte, sender id, counter, timestamp.
const HEADER_LEN: usize = 1 + 8 + 8 + 8;
/// Poly1305 tag.
const TAG_LEN: usize = 16;
/// Bytes sealing adds to a datagram.
pub(crate) const OVERHEAD: usize = HEADER_LEN + TAG_LEN;

/// How far (in the sender's datagrams) a datagram may arrive behind the
/// newest one seen from its sender. A node sends a handful of datagrams per
/// gossip round, so 128 is many rounds of reordering, which UDP on a LAN does
/// not produce.
pub(crate) const REORDER_WINDOW: u64 = 128;

/// Most senders tracked at once. Only datagrams that carry a valid tag create
/// a record (so only key holders can fill this), and a record lives two
/// replay windows: a cluster has one sender per running process.
pub(crate) const MAX_SENDERS: usize = 4_096;

/// Why a received datagram was dropped; the `reason` label of
/// `herald_gossip_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Rejection {
    /// Too short, or not in a format this node knows (a plain chitchat
    /// datagram from a node without the key lands here). Nothing was decrypted.
    #[error("not a sealed gossip datagram")]
    Malformed,
    /// The tag did not verify under any key of the ring: a forged or altered
    /// datagram, or one sealed with a key this node does not hold.
    #[error("authentication tag does not verify with any gossip key")]
    BadTag,
    /// Authentic, but its timestamp is outside the replay window (a replay of
    /// an old datagram, or a sender whose clock is far off), or it is too far
    /// behind its sender's newest datagram to be checked.
    #[error("timestamp or counter outside the replay window")]
    Stale,
    /// Authentic, and already received once: a replay.
    #[error("datagram already received")]
    Replayed,
    /// Authentic and fresh, but [`MAX_SENDERS`] senders are already tracked.
    #[error("too many gossip senders tracked")]
    TooManySenders,
}

impl Rejection {
    /// Every reason, for documentation and tests.
    pub(crate) const ALL: [Rejection; 5] = [
        Rejection::Malformed,
        Rejection::BadTag,
        Rejection::Stale,
        Rejection::Replayed,
        Rejection::TooManySenders,
    ];

    /// The metric label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::BadTag => "bad_tag",
            Rejection::Stale => "stale",
            Rejection::Replayed => "replayed",
            Rejection::TooManySenders => "too_many_senders",
        }
    }
}

/// The gossip keys of this node: the first seals, every one opens.
pub(crate) struct Keyring {
    ciphers: Vec<XChaCha20Poly1305>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("keys", &self.ciphers.len())
            .finish()
    }
}

impl Keyring {
    /// A ring of `keys`, the sealing key first; `None` when `keys` is empty.
    pub(crate) fn new(keys: &[[u8; KEY_LEN]]) -> Option<Keyring> {
        if keys.is_empty() {
            return None;
        }
        let ciphers = keys
            .iter()
            .map(|key| XChaCha20Poly1305::new(&Key::from(*key)))
            .collect();
        Some(Keyring { ciphers })
    }

    /// How many keys the ring holds.
    pub(crate) fn len(&self) -> usize {
        self.ciphers.len()
    }

    fn sealing(&self) -> &XChaCha20Poly1305 {
        self.ciphers
            .first()
            .expect("Keyring::new refuses an empty list")
    }
}

/// Seals this node's outgoing datagrams.
#[derive(Debug)]
pub(crate) struct Sealer {
    sender: u64,
    counter: u64,
}

impl Sealer {
    /// A sealer with a fresh random sender id.
    pub(crate) fn new() -> Sealer {
        Sealer::with_sender(OsRng.next_u64())
    }

    fn with_sender(sender: u64) -> Sealer {
        Sealer { sender, counter: 0 }
    }

    /// Writes `plaintext` sealed with the ring's first key into `out`
    /// (cleared first), stamped `now_ms` (milliseconds since the Unix epoch).
    pub(crate) fn seal(
        &mut self,
        keys: &Keyring,
        plaintext: &[u8],
        now_ms: u64,
        out: &mut Vec<u8>,
    ) {
        self.counter += 1;
        out.clear();
        out.reserve(plaintext.len() + OVERHEAD);
        out.push(FORMAT_V1);
        out.extend_from_slice(&self.sender.to_be_bytes());
        out.extend_from_slice(&self.counter.to_be_bytes());
        out.extend_from_slice(&now_ms.to_be_bytes());
        out.extend_from_slice(plaintext);
        let (header, body) = out.split_at_mut(HEADER_LEN);
        let nonce = nonce_of(header);
        let tag = keys
            .sealing()
            .encrypt_in_place_detached(&nonce, header, body)
            .expect("a gossip datagram is far below XChaCha20's 256 GiB message limit");
        out.extend_from_slice(&tag);
    }
}

/// What is remembered of one sender: its newest counter and which of the
/// [`REORDER_WINDOW`] counters before it were seen.
#[derive(Debug, Clone, Copy)]
struct SenderWindow {
    newest: u64,
    /// Bit `i` set: counter `newest - i` was received.
    seen: u128,
    /// This node's clock when the sender was last heard, ms.
    last_heard_ms: u64,
}

impl SenderWindow {
    /// Records `counter`; `Err` if it was seen or is too old to tell.
    fn accept(&mut self, counter: u64) -> Result<(), Rejection> {
        if counter > self.newest {
            let shift = counter - self.newest;
            self.seen = if shift >= REORDER_WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.newest = counter;
            return Ok(());
        }
        let behind = self.newest - counter;
        if behind >= REORDER_WINDOW {
            return Err(Rejection::Stale);
        }
        let bit = 1u128 << behind;
        if self.seen & bit != 0 {
            return Err(Rejection::Replayed);
        }
        self.seen |= bit;
        Ok(())
    }
}

/// Opens received datagrams and remembers what it has seen.
#[derive(Debug)]
pub(crate) struct Opener {
    window_ms: u64,
    senders: HashMap<u64, SenderWindow>,
    /// When records were last pruned, ms.
    pruned_at_ms: u64,
}

impl Opener {
    /// An opener accepting timestamps within `window_ms` of this node's clock.
    pub(crate) fn new(window_ms: u64) -> Opener {
        Opener {
            window_ms,
            senders: HashMap::new(),
            pruned_at_ms: 0,
        }
    }

    /// Checks `datagram` and decrypts it in place; returns the plaintext (a
    /// slice of `datagram`). On `Err` nothing was recorded, and the bytes may
    /// be left as they were or partly decrypted.
    pub(crate) fn open<'a>(
        &mut self,
        keys: &Keyring,
        datagram: &'a mut [u8],
        now_ms: u64,
    ) -> Result<&'a [u8], Rejection> {
        if datagram.len() < OVERHEAD || datagram[0] != FORMAT_V1 {
            return Err(Rejection::Malformed);
        }
        let (header, rest) = datagram.split_at_mut(HEADER_LEN);
        let (body, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
        let nonce = nonce_of(header);
        let tag = Tag::from(<[u8; TAG_LEN]>::try_from(&*tag).expect("split TAG_LEN bytes off"));
        let opened = keys.ciphers.iter().any(|cipher| {
            cipher
                .decrypt_in_place_detached(&nonce, header, body, &tag)
                .is_ok()
        });
        if !opened {
            return Err(Rejection::BadTag);
        }
        let sender = read_u64(&header[1..9]);
        let counter = read_u64(&header[9..17]);
        let sent_ms = read_u64(&header[17..25]);
        if sent_ms.abs_diff(now_ms) > self.window_ms {
            return Err(Rejection::Stale);
        }
        self.record(sender, counter, now_ms)?;
        Ok(body)
    }

    fn record(&mut self, sender: u64, counter: u64, now_ms: u64) -> Result<(), Rejection> {
        if let Some(window) = self.senders.get_mut(&sender) {
            window.accept(counter)?;
            window.last_heard_ms = now_ms;
            return Ok(());
        }
        if now_ms.saturating_sub(self.pruned_at_ms) >= self.window_ms
            || self.senders.len() >= MAX_SENDERS
        {
            self.prune(now_ms);
        }
        if self.senders.len() >= MAX_SENDERS {
            return Err(Rejection::TooManySenders);
        }
        self.senders.insert(
            sender,
            SenderWindow {
                newest: counter,
                seen: 1,
                last_heard_ms: now_ms,
            },
        );
        Ok(())
    }

    /// Forgets senders not heard for two windows: whatever they sent before
    /// is `stale` by now, so their records protect nothing any more.
    fn prune(&mut self, now_ms: u64) {
        let keep_ms = self.window_ms.saturating_mul(2);
        self.senders
            .retain(|_, window| now_ms.saturating_sub(window.last_heard_ms) <= keep_ms);
        self.pruned_at_ms = now_ms;
    }
}

/// The nonce: the header after its format byte (sender, counter, timestamp).
fn nonce_of(header: &[u8]) -> XNonce {
    let bytes: [u8; HEADER_LEN - 1] = header[1..HEADER_LEN]
        .try_into()
        .expect("the header is HEADER_LEN bytes");
    XNonce::from(bytes)
}

fn read_u64(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    buf.copy_from_slice(bytes);
    u64::from_be_bytes(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: [u8; KEY_LEN] = [7; KEY_LEN];
    const KEY_B: [u8; KEY_LEN] = [9; KEY_LEN];
    const WINDOW_MS: u64 = 10_000;
    const NOW: u64 = 1_800_000_000_000;

    fn ring(keys: &[[u8; KEY_LEN]]) -> Keyring {
        Keyring::new(keys).expect("non-empty")
    }

    fn sealed(sealer: &mut Sealer, keys: &Keyring, plaintext: &[u8], at: u64) -> Vec<u8> {
        let mut out = Vec::new();
        sealer.seal(keys, plaintext, at, &mut out);
        out
    }

    fn open(
        opener: &mut Opener,
        keys: &Keyring,
        mut datagram: Vec<u8>,
        at: u64,
    ) -> Result<Vec<u8>, Rejection> {
        opener.open(keys, &mut datagram, at).map(<[u8]>::to_vec)
    }

    #[test]
    fn a_sealed_datagram_opens_to_its_plaintext_and_hides_it() {
        let keys = ring(&[KEY_A]);
        let plaintext = b"node-a http://10.0.0.7:8080 connections=42";
        let datagram = sealed(&mut Sealer::new(), &keys, plaintext, NOW);
        assert_eq!(datagram.len(), plaintext.len() + OVERHEAD);
        assert!(
            !datagram.windows(9).any(|w| w == b"10.0.0.7:"),
            "the address must not travel in clear"
        );
        let mut opener = Opener::new(WINDOW_MS);
        assert_eq!(
            open(&mut opener, &keys, datagram, NOW),
            Ok(plaintext.to_vec())
        );
    }

    #[test]
    fn a_datagram_sealed_with_another_key_is_refused_as_bad_tag() {
        let datagram = sealed(&mut Sealer::new(), &ring(&[KEY_B]), b"hello", NOW);
        let mut opener = Opener::new(WINDOW_MS);
        assert_eq!(
            open(&mut opener, &ring(&[KEY_A]), datagram, NOW),
            Err(Rejection::BadTag)
        );
    }

    #[test]
    fn changing_any_single_byte_makes_the_datagram_fail() {
        let keys = ring(&[KEY_A]);
        let datagram = sealed(&mut Sealer::new(), &keys, b"state of node-a", NOW);
        for index in 0..datagram.len() {
            let mut tampered = datagram.clone();
            tampered[index] ^= 0x01;
            let expected = if index == 0 {
                Rejection::Malformed
            } else {
                Rejection::BadTag
            };
            let mut opener = Opener::new(WINDOW_MS);
            assert_eq!(
                open(&mut opener, &keys, tampered, NOW),
                Err(expected),
                "byte {index} flipped"
            );
        }
    }

    #[test]
    fn short_or_plain_datagrams_are_malformed() {
        let keys = ring(&[KEY_A]);
        let mut opener = Opener::new(WINDOW_MS);
        assert_eq!(
            open(&mut opener, &keys, Vec::new(), NOW),
            Err(Rejection::Malformed)
        );
        assert_eq!(
            open(&mut opener, &keys, vec![FORMAT_V1; OVERHEAD - 1], NOW),
            Err(Rejection::Malformed)
        );
        // A plain chitchat datagram starts with its magic number 45139 (LE).
        let mut plain = vec![0x53, 0xb0, 0x00, 0x01];
        plain.resize(200, 0);
        assert_eq!(
            open(&mut opener, &keys, plain, NOW),
            Err(Rejection::Malformed)
        );
    }

    #[test]
    fn a_timestamp_outside_the_window_on_either_side_is_stale() {
        let keys = ring(&[KEY_A]);
        let mut sealer = Sealer::new();
        let mut opener = Opener::new(WINDOW_MS);
        let old = sealed(&mut sealer, &keys, b"x", NOW - WINDOW_MS - 1);
        let future = sealed(&mut sealer, &keys, b"x", NOW + WINDOW_MS + 1);
        let edge = sealed(&mut sealer, &keys, b"x", NOW - WINDOW_MS);
        assert_eq!(open(&mut opener, &keys, old, NOW), Err(Rejection::Stale));
        assert_eq!(open(&mut opener, &keys, future, NOW), Err(Rejection::Stale));
        assert!(open(&mut opener, &keys, edge, NOW).is_ok());
    }

    #[test]
    fn a_datagram_received_twice_is_replayed_the_second_time() {
        let keys = ring(&[KEY_A]);
        let datagram = sealed(&mut Sealer::new(), &keys, b"syn", NOW);
        let mut opener = Opener::new(WINDOW_MS);
        assert!(open(&mut opener, &keys, datagram.clone(), NOW).is_ok());
        assert_eq!(
            open(&mut opener, &keys, datagram.clone(), NOW + 1),
            Err(Rejection::Replayed)
        );
        // After the window the same bytes are stale, whatever was recorded.
        assert_eq!(
            open(&mut opener, &keys, datagram, NOW + WINDOW_MS + 1),
            Err(Rejection::Stale)
        );
    }

    #[test]
    fn datagrams_reordered_within_the_window_are_all_accepted_once() {
        let keys = ring(&[KEY_A]);
        let mut sealer = Sealer::new();
        let datagrams: Vec<Vec<u8>> = (0..10)
            .map(|i| sealed(&mut sealer, &keys, &[i], NOW))
            .collect();
        let mut opener = Opener::new(WINDOW_MS);
        for index in [3, 0, 9, 1, 2, 8, 4, 7, 5, 6] {
            assert!(
                open(&mut opener, &keys, datagrams[index].clone(), NOW).is_ok(),
                "{index}"
            );
        }
        for datagram in datagrams {
            assert_eq!(
                open(&mut opener, &keys, datagram, NOW),
                Err(Rejection::Replayed)
            );
        }
    }

    #[test]
    fn a_datagram_further_behind_its_sender_than_the_reorder_window_is_stale() {
        let keys = ring(&[KEY_A]);
        let mut sealer = Sealer::new();
        let first = sealed(&mut sealer, &keys, b"first", NOW);
        for _ in 0..REORDER_WINDOW {
            sealed(&mut sealer, &keys, b"skipped", NOW);
        }
        let latest = sealed(&mut sealer, &keys, b"latest", NOW);
        let mut opener = Opener::new(WINDOW_MS);
        assert!(open(&mut opener, &keys, latest, NOW).is_ok());
        assert_eq!(open(&mut opener, &keys, first, NOW), Err(Rejection::Stale));
    }

    #[test]
    fn two_senders_with_the_same_counters_do_not_shadow_each_other() {
        let keys = ring(&[KEY_A]);
        let a = sealed(&mut Sealer::with_sender(1), &keys, b"a", NOW);
        let b = sealed(&mut Sealer::with_sender(2), &keys, b"b", NOW);
        let mut opener = Opener::new(WINDOW_MS);
        assert!(open(&mut opener, &keys, a, NOW).is_ok());
        assert!(open(&mut opener, &keys, b, NOW).is_ok());
    }

    #[test]
    fn during_a_rotation_both_keys_open_and_only_the_first_seals() {
        let old = ring(&[KEY_A]);
        let rotating = ring(&[KEY_B, KEY_A]);
        let new = ring(&[KEY_B]);
        let mut opener = Opener::new(WINDOW_MS);
        // A node still on the old key is understood by a rotating one...
        let from_old = sealed(&mut Sealer::new(), &old, b"old", NOW);
        assert!(open(&mut opener, &rotating, from_old, NOW).is_ok());
        // ...and a rotating node seals with the new key only.
        let from_rotating = sealed(&mut Sealer::new(), &rotating, b"rotating", NOW);
        assert!(open(&mut opener, &new, from_rotating.clone(), NOW).is_ok());
        assert_eq!(
            open(&mut Opener::new(WINDOW_MS), &old, from_rotating, NOW),
            Err(Rejection::BadTag)
        );
    }

    #[test]
    fn a_forged_datagram_leaves_no_record_that_could_block_the_real_one() {
        let keys = ring(&[KEY_A]);
        let mut sealer = Sealer::with_sender(5);
        let genuine = sealed(&mut sealer, &keys, b"genuine", NOW);
        // Same header, wrong key: rejected before anything is recorded.
        let forged = sealed(&mut Sealer::with_sender(5), &ring(&[KEY_B]), b"forged", NOW);
        let mut opener = Opener::new(WINDOW_MS);
        assert_eq!(
            open(&mut opener, &keys, forged, NOW),
            Err(Rejection::BadTag)
        );
        assert_eq!(
            open(&mut opener, &keys, genuine, NOW),
            Ok(b"genuine".to_vec())
        );
    }

    #[test]
    fn senders_silent_for_two_windows_are_forgotten_and_the_table_is_bounded() {
        let keys = ring(&[KEY_A]);
        let mut opener = Opener::new(WINDOW_MS);
        for sender in 0..MAX_SENDERS as u64 {
            let datagram = sealed(&mut Sealer::with_sender(sender), &keys, b"x", NOW);
            assert!(open(&mut opener, &keys, datagram, NOW).is_ok());
        }
        let one_more = sealed(&mut Sealer::with_sender(u64::MAX), &keys, b"x", NOW);
        assert_eq!(
            open(&mut opener, &keys, one_more, NOW),
            Err(Rejection::TooManySenders)
        );
        let later = NOW + 2 * WINDOW_MS + 1;
        let after_silence = sealed(&mut Sealer::with_sender(u64::MAX), &keys, b"x", later);
        assert!(open(&mut opener, &keys, after_silence, later).is_ok());
        assert_eq!(opener.senders.len(), 1);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_open_and_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            let keys = ring(&[KEY_A]);
            let mut opener = Opener::new(WINDOW_MS);
            let result = open(&mut opener, &keys, bytes, NOW);
            proptest::prop_assert!(matches!(result, Err(Rejection::Malformed | Rejection::BadTag)));
        }

        #[test]
        fn any_plaintext_round_trips(plaintext in proptest::collection::vec(proptest::num::u8::ANY, 0..4096)) {
            let keys = ring(&[KEY_A]);
            let datagram = sealed(&mut Sealer::new(), &keys, &plaintext, NOW);
            let mut opener = Opener::new(WINDOW_MS);
            proptest::prop_assert_eq!(open(&mut opener, &keys, datagram, NOW), Ok(plaintext));
        }
    }

    #[test]
    fn an_empty_key_list_makes_no_ring() {
        assert!(Keyring::new(&[]).is_none());
    }
}
