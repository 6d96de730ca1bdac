//! Publisher credentials already verified ([`VerifiedPublishers`]), so a
//! service publishing many events with one token pays the signature check,
//! the base64 and JSON decoding and the digest of its id once, not per event.
//!
//! Only what cannot change is kept: an entry is the [`Publisher`] one exact
//! token (its bytes, signature included) verified to, and only tokens of
//! issuers whose keys are fixed for the life of the process (`hs256_secret`,
//! `public_key_file`) are kept at all; tokens checked against a key set that
//! can rotate (JWKS, OIDC) are verified every time. Time is the one input
//! that moves: a hit is served only while the token's `exp` (plus the
//! leeway, as the full check counts it) has not passed; after that the
//! token is verified again, which refuses it. `nbf` only ever becomes more
//! true, and publisher credentials are not subject to revocation (that is
//! for users' stream tokens). Refusals are never kept, so nothing a client
//! sends without a valid credential takes room here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::Publisher;

/// Most tokens kept; when full, expired entries go, and if none had, all do
/// (a publisher with many live tokens then pays full checks, nothing worse).
pub(super) const MAX_VERIFIED_PUBLISHERS: usize = 1024;

/// Verified publisher tokens, by their exact text.
#[derive(Debug, Default)]
pub(super) struct VerifiedPublishers {
    entries: Mutex<HashMap<Box<str>, Verified>>,
}

#[derive(Debug)]
struct Verified {
    /// The token's `exp`.
    exp: u64,
    publisher: Arc<Publisher>,
}

impl VerifiedPublishers {
    /// The publisher `token` verified to, if it did and is still unexpired
    /// at `now` (seconds since the epoch) with `leeway` seconds of tolerance.
    pub(super) fn get(&self, token: &str, now: u64, leeway: u64) -> Option<Arc<Publisher>> {
        let mut entries = self.lock();
        let entry = entries.get(token)?;
        if unexpired(entry.exp, now, leeway) {
            return Some(Arc::clone(&entry.publisher));
        }
        entries.remove(token);
        None
    }

    /// Keeps what `token` (expiring at `exp`) verified to.
    pub(super) fn insert(
        &self,
        token: &str,
        exp: u64,
        publisher: &Arc<Publisher>,
        now: u64,
        leeway: u64,
    ) {
        let mut entries = self.lock();
        if entries.len() >= MAX_VERIFIED_PUBLISHERS && !entries.contains_key(token) {
            entries.retain(|_, entry| unexpired(entry.exp, now, leeway));
            if entries.len() >= MAX_VERIFIED_PUBLISHERS {
                entries.clear();
            }
        }
        entries.insert(
            token.into(),
            Verified {
                exp,
                publisher: Arc::clone(publisher),
            },
        );
    }

    /// Tokens kept.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Verified>> {
        // Entries are whole or absent; a panic elsewhere leaves them usable.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The full check's rule (jsonwebtoken): expired once `exp < now - leeway`.
fn unexpired(exp: u64, now: u64, leeway: u64) -> bool {
    exp >= now.saturating_sub(leeway)
}
