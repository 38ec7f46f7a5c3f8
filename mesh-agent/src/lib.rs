//! The per-node agent of the mesh: loads and pins the kernel programs, keeps their maps in step
//! with the cluster model, and reports what the data path does.

pub mod admin;
pub mod app;
pub mod authz;
pub mod config;
pub mod datapath;
pub mod discovery;
pub mod drain;
pub mod flows;
pub mod gateway;
pub mod health;
pub mod heap;
pub mod identity;
pub mod logging;
pub mod meshsync;
pub mod model;
pub mod owner;
pub mod policy;
pub mod proxy;
pub mod reconcile;
pub mod relay;
pub mod state;
pub mod supervisor;
pub mod sys;
pub mod telemetry;
