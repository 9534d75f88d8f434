//! The token store, read side: every current Tallyfy token in one `ArcSwap` snapshot.
//!
//! A request takes its token with one atomic load and one `HeaderValue` clone (a
//! reference-count bump): no lock, no `.await`, never a call to the token endpoint.
//! The refresher ([`refresh`]) is the single writer: it builds a whole new
//! snapshot and swaps it in, so readers always see a consistent set.
//!
//! There is one store and one refresher for the life of the process. Each token
//! lives in a *slot* ([`SlotId`]); a config generation maps its credentials onto
//! slots ([`CredentialTokens`]). A reload that leaves a credential unchanged maps
//! it onto the same slot, so its token, its schedule, a refresh already running
//! and the requests waiting for it all carry over; a changed credential gets a
//! new slot. Time is `tokio::time::Instant`, so tests can stop the clock.

mod credential;
mod credential_tokens;
pub mod issuer;
pub mod jwt;
pub mod refresh;
pub mod schedule;
mod settings;
mod source;
mod store;
mod token;

pub use credential::{Credential, CredentialId, CredentialKind, OAuthClient, Provision};
pub use credential_tokens::CredentialTokens;
pub use refresh::CredentialSet;
pub use settings::Settings;
pub use source::{Answer, TokenSource};
pub use store::{SlotId, TokenStore};
pub use token::{InvalidToken, Lease, Token, Unavailable};
