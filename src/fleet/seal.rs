//! Tokens at rest: AES-256-GCM under the fleet's `encryption_key`, a fresh
//! random nonce per write, and the Redis key as associated data (a value
//! copied under another credential's key does not open).

use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};

const NONCE_LEN: usize = 12;

/// The fleet's 32-byte key. `Debug` never prints it.
#[derive(Clone)]
pub struct EncryptionKey(Box<[u8; 32]>);

impl EncryptionKey {
    /// From the configured base64 text (standard or URL-safe alphabet, padding optional).
    pub fn from_base64(text: &str) -> Result<EncryptionKey, &'static str> {
        use base64::Engine;
        let text = text.trim();
        let engines = [
            &base64::engine::general_purpose::STANDARD,
            &base64::engine::general_purpose::STANDARD_NO_PAD,
            &base64::engine::general_purpose::URL_SAFE,
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ];
        let bytes = engines
            .iter()
            .find_map(|engine| engine.decode(text).ok())
            .ok_or("is not base64 (make one with: head -c 32 /dev/urandom | base64)")?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| "must decode to exactly 32 bytes")?;
        Ok(EncryptionKey(Box::new(key)))
    }

    /// Whether both are the same key (compared in constant time).
    pub fn same_as(&self, other: &EncryptionKey) -> bool {
        use subtle::ConstantTimeEq;
        self.0[..].ct_eq(&other.0[..]).into()
    }

    /// A name for this key in the fleet `prefix` that reveals nothing of it:
    /// the hex SHA-256 of a label, the prefix and the key. Replicas compare it
    /// in Redis, inside the scripts that take leases and write sets, so the
    /// comparison and the write are one atomic step. The prefix is in it, so
    /// two fleets sharing a key do not show it.
    pub fn fingerprint(&self, prefix: &str) -> String {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update(b"tallyfy-proxy fleet key fingerprint\0");
        hash.update((prefix.len() as u64).to_be_bytes());
        hash.update(prefix.as_bytes());
        hash.update(&self.0[..]);
        hash.finalize().iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// Seals `plaintext` for the Redis key `at`: nonce, then ciphertext and tag.
    pub fn seal(&self, at: &str, plaintext: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let cipher = Aes256Gcm::new_from_slice(&self.0[..]).expect("a 32-byte key");
        let sealed = cipher
            .encrypt(&Nonce::from(nonce), Payload { msg: plaintext, aad: at.as_bytes() })
            .expect("AES-GCM seals any message this size");
        [&nonce[..], &sealed].concat()
    }

    /// Opens what [`EncryptionKey::seal`] sealed for `at`; `None` when the key
    /// differs or the bytes were altered or moved.
    pub fn open(&self, at: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        let (nonce, ciphertext) = sealed.split_at_checked(NONCE_LEN)?;
        let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
        let cipher = Aes256Gcm::new_from_slice(&self.0[..]).ok()?;
        cipher.decrypt(&Nonce::from(nonce), Payload { msg: ciphertext, aad: at.as_bytes() }).ok()
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> EncryptionKey {
        use base64::Engine;
        EncryptionKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([byte; 32]))
            .expect("key")
    }

    #[test]
    fn sealed_opens_only_with_the_same_key_at_the_same_place() {
        let sealed = key(1).seal("fleet/tokens/a", b"access-token-value");
        assert!(!sealed.windows(6).any(|w| w == b"access"), "no plaintext in the sealed bytes");
        assert_eq!(key(1).open("fleet/tokens/a", &sealed).as_deref(), Some(&b"access-token-value"[..]));
        assert_eq!(key(2).open("fleet/tokens/a", &sealed), None, "another key");
        assert_eq!(key(1).open("fleet/tokens/b", &sealed), None, "moved to another credential's key");
        let mut altered = sealed.clone();
        *altered.last_mut().expect("bytes") ^= 1;
        assert_eq!(key(1).open("fleet/tokens/a", &altered), None, "altered");
        assert_ne!(key(1).seal("fleet/tokens/a", b"x"), key(1).seal("fleet/tokens/a", b"x"), "fresh nonces");
    }

    #[test]
    fn fingerprints_tell_keys_apart_and_hold_no_key_bytes() {
        assert_eq!(key(1).fingerprint("a"), key(1).fingerprint("a"));
        assert_ne!(key(1).fingerprint("a"), key(2).fingerprint("a"));
        assert_ne!(key(1).fingerprint("a"), key(1).fingerprint("b"), "fleets sharing a key do not show it");
        assert_eq!(key(1).fingerprint("a").len(), 64);
        assert!(!key(1).fingerprint("a").contains("01010101"), "not the key in hex");
    }

    #[test]
    fn keys_must_be_32_bytes_of_base64_and_never_print() {
        assert!(EncryptionKey::from_base64("not base64!").is_err());
        assert!(EncryptionKey::from_base64("c2hvcnQ=").is_err(), "too short");
        let text = format!("{:?}", key(7));
        assert_eq!(text, "EncryptionKey([redacted])");
    }
}
