//! Body plumbing, shared by the pipeline and the rewriters: which bodies can be
//! read and how they are encoded ([`content`]), reading a bounded start of a
//! body ([`read`]), and the wrappers every request and response body passes
//! through: [`Prefixed`] (what was read, then the rest), [`DataOnly`] (a
//! body without its trailers), [`Tracked`] (when the request body
//! last moved, for the upstream timeout, and how it failed) and [`Finished`] (the
//! moment a response is over, for its access line and metrics); and the
//! [`Budget`] every body held whole is counted against.

mod budget;
mod content;
mod data_only;
mod finished;
mod prefixed;
mod read;
mod tracked;

pub use budget::{Budget, Reservation, held_forced};
pub use content::{Decoded, Encoding, Kind, decode, encoding, kind, request_kind};
pub use data_only::DataOnly;
pub use finished::{Finish, Finished};
pub use prefixed::Prefixed;
pub use read::{BodyStart, ChunkStart, Chunks, Unread, read_chunks, read_up_to, within};
pub use tracked::{BodyFailure, Progress, Tracked};
