//! `[fleet]`, validated.

use std::time::Duration;

use super::seal::EncryptionKey;
use crate::secret::Secret;

#[derive(Debug, Clone)]
pub struct Settings {
    /// `redis://` or `rediss://`; may hold a password, so it is a secret.
    pub redis_url: Secret,
    /// Replicas with the same prefix form one fleet.
    pub key_prefix: String,
    pub encryption_key: EncryptionKey,
    /// How long a refresh lease lasts (longer than any token call sequence).
    pub lease: Duration,
}

impl Settings {
    /// What a reload compares: the same Redis, fleet, key and lease.
    pub fn same_as(&self, other: &Settings) -> bool {
        self.redis_url == other.redis_url
            && self.key_prefix == other.key_prefix
            && self.encryption_key.same_as(&other.encryption_key)
            && self.lease == other.lease
    }
}
