//! Workload identity: SPIFFE ids, the certificates that carry them, and the CA that signs them.

pub mod spiffe;

pub use spiffe::{SpiffeId, SpiffeIdError};
