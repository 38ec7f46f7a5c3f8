//! The relay (`mesh-agent relay`, Hubble Relay's role): gathers flows from every agent over the
//! admin flow API on mTLS, serves them merged on the same `WatchFlows` API, and a live map page.

pub mod graph;
