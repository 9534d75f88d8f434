//! A credential's token set in Redis and the lease that guards its refresh.
//! Each call is one round trip; the set is sealed and opened here, so only
//! plaintext crosses to the refresher and only ciphertext to Redis.

use std::time::Duration;

use super::{Fence, Fleet, FleetError, News, scripts};

/// The most bytes a sealed set read from Redis may hold: a set holds tokens of
/// answers the issuer reads up to 64 KiB, so a longer value is none of the
/// fleet's, and is not read.
const MAX_SEALED_BYTES: usize = 256 * 1024;

/// What [`Fleet::read`] found: the opened set and how long Redis keeps it
/// (its token's remaining life, on Redis's clock, whatever the replicas' say).
pub struct Stored {
    /// The opened set: its tokens in clear, never shown by `Debug`.
    pub plaintext: Vec<u8>,
    pub ttl: Duration,
    /// The last generation the fleet announced for the credential (0: none
    /// recorded). A set below it is an older one back in Redis.
    pub announced: u64,
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored")
            .field("plaintext", &format_args!("[redacted, {} bytes]", self.plaintext.len()))
            .field("ttl", &self.ttl)
            .field("announced", &self.announced)
            .finish()
    }
}

/// Whether a write tells the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announce {
    /// A new generation: published on the channel and in the generations.
    NewGeneration,
    /// The same generation, rewritten (its refresh token marked spent).
    Quietly,
}

impl Fleet {
    /// Whether `sealed`, under `at`, is not the set that last failed to open
    /// there (and remembers it, a digest of it, as that set).
    fn first_unopened(&self, at: &str, sealed: &[u8]) -> bool {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(sealed).into();
        let mut unopened = self.unopened.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Bounded by the credentials: one key each.
        unopened.insert(at.to_owned(), digest) != Some(digest)
    }

    /// The credential's token set, opened, with the generation last announced
    /// for it; `None` when the fleet holds none.
    pub async fn read(&self, credential: &str) -> Result<Option<Stored>, FleetError> {
        self.key_accepted()?;
        let mut connection = self.connection()?;
        let at = self.key("tokens", credential);
        let mut invocation = scripts::scripts().read.prepare_invoke();
        invocation.key(&at).key(self.generations_key()).arg(MAX_SEALED_BYTES).arg(credential);
        let (sealed, ttl_ms, announced): (Vec<u8>, i64, Option<String>) =
            self.call(invocation.invoke_async(&mut connection)).await?;
        // A generation that is no number (someone else's write) is none.
        let announced: Option<u64> = announced.and_then(|announced| announced.parse().ok());
        let Some(sealed) = Some(sealed).filter(|sealed| !sealed.is_empty() && ttl_ms > 0) else {
            return Ok(None);
        };
        let opened = self.settings.encryption_key.open(&at, &sealed);
        if opened.is_some() {
            // A set that breaks again later, the same bytes as before, is news.
            self.unopened.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&at);
        }
        let Some(plaintext) = opened else {
            // The fleet's key is this replica's (checked above): a set that does
            // not open with it is corrupted, or was written by a replica of an
            // earlier version with another key. It is no set: the next refresh
            // takes the lease and writes a new one over it. Said once for the
            // same value: news of its generation has it read at every poll.
            if !self.first_unopened(&at, &sealed) {
                return Ok(None);
            }
            self.metrics.fleet_undecryptable.inc();
            tracing::error!(
                credential,
                "fleet: a token set does not open with the fleet's key (corrupted, or written by a replica \
                 of an earlier version with another key); it is replaced under the lease"
            );
            return Ok(None);
        };
        let announced = announced.unwrap_or(0);
        Ok(Some(Stored { plaintext, ttl: Duration::from_millis(ttl_ms as u64), announced }))
    }

    /// Takes the credential's refresh lease for [`Fleet::lease`]; `None` while
    /// another replica holds it.
    pub async fn acquire(&self, credential: &str) -> Result<Option<Fence>, FleetError> {
        self.key_accepted()?;
        let mut connection = self.connection()?;
        let mut settled = false;
        loop {
            let mut invocation = scripts::scripts().acquire.prepare_invoke();
            invocation
                .key(self.key("lease", credential))
                .key(format!("{}/fence", self.settings.key_prefix))
                .key(self.fingerprint_key())
                .key(self.key_check_key())
                .arg(self.settings.lease.as_millis() as u64)
                .arg(&self.fingerprint);
            let fence: i64 = self.call(invocation.invoke_async(&mut connection)).await?;
            if self.check_first(fence, &mut settled).await? {
                return Ok((fence > 0).then_some(Fence(fence as u64)));
            }
        }
    }

    /// Whether a replica holds the credential's refresh lease now (a refresh
    /// for the fleet is under way).
    pub async fn refreshing(&self, credential: &str) -> Result<bool, FleetError> {
        self.key_accepted()?;
        let mut connection = self.connection()?;
        self.call(redis::cmd("EXISTS").arg(self.key("lease", credential)).query_async(&mut connection)).await
    }

    /// Extends a held lease by [`Fleet::lease`]; `false` when it was lost.
    pub async fn extend(&self, credential: &str, fence: Fence) -> Result<bool, FleetError> {
        let mut connection = self.connection()?;
        let mut invocation = scripts::scripts().extend.prepare_invoke();
        invocation
            .key(self.key("lease", credential))
            .arg(fence.0)
            .arg(self.settings.lease.as_millis() as u64);
        let extended: u64 = self.call(invocation.invoke_async(&mut connection)).await?;
        Ok(extended == 1)
    }

    /// Gives a held lease back (nothing when it lapsed and another holds it now).
    pub async fn release(&self, credential: &str, fence: Fence) {
        let Ok(mut connection) = self.connection() else { return };
        let mut invocation = scripts::scripts().release.prepare_invoke();
        invocation.key(self.key("lease", credential)).arg(fence.0);
        let _: Result<u64, _> = self.call(invocation.invoke_async(&mut connection)).await;
    }

    /// Seals and writes the credential's set, living `ttl` in Redis, while the
    /// lease is held with `fence`; a new generation (numbered `fence`) is
    /// announced. `false` (nothing written) when the lease is no longer held;
    /// `Undecryptable` (nothing written) when the fleet's key is now another.
    pub async fn write(
        &self,
        credential: &str,
        fence: Fence,
        plaintext: &[u8],
        ttl: Duration,
        announce: Announce,
    ) -> Result<bool, FleetError> {
        let mut connection = self.connection()?;
        let at = self.key("tokens", credential);
        let sealed = self.settings.encryption_key.seal(&at, plaintext);
        let news = match announce {
            Announce::NewGeneration => {
                News::Tokens { credential: credential.into(), generation: fence.0 }.encode(self.replica)
            }
            Announce::Quietly => String::new(),
        };
        let mut settled = false;
        loop {
            let mut invocation = scripts::scripts().write.prepare_invoke();
            invocation
                .key(self.key("lease", credential))
                .key(&at)
                .key(self.channel())
                .key(self.generations_key())
                .key(self.fingerprint_key())
                .key(self.key_check_key())
                .arg(fence.0)
                .arg(&sealed)
                .arg(ttl.as_millis().max(1) as u64)
                .arg(&news)
                .arg(credential)
                .arg(&self.fingerprint);
            let written: i64 = self.call(invocation.invoke_async(&mut connection)).await?;
            if self.check_first(written, &mut settled).await? {
                return Ok(written == 1);
            }
        }
    }

    /// What a lease or write script's answer means: `true` to take it; -1,
    /// the fleet's key is another; -2, only the key check of earlier versions
    /// is there, so the key check script decides (and names the fingerprint
    /// beside it when this replica's key opens it), then the script runs once
    /// more.
    async fn check_first(&self, answer: i64, settled: &mut bool) -> Result<bool, FleetError> {
        match answer {
            -2 if !*settled => {
                *settled = true;
                self.check_key().await?;
                self.key_accepted()?;
                Ok(false)
            }
            -2 => Err(FleetError::Unreachable("the fleet's key check is not settled".into())),
            refused if refused < 0 => Err(self.refused_by_script()),
            _ => Ok(true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_opened_set_never_shows_its_tokens() {
        let stored = Stored {
            plaintext: br#"{"access_token":"at-s3cret","refresh_token":"rt-s3cret"}"#.to_vec(),
            ttl: Duration::from_secs(60),
            announced: 3,
        };
        let shown = format!("{stored:?} {:?}", Ok::<_, ()>(Some(&stored)));
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }
}
