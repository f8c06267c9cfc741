//! concatd: concatenate objects (local files, HTTP(S), S3) into one verified, atomically
//! published output.
//!
//! The library holds everything; `main.rs` only parses the command line and turns the outcome
//! into an exit code. Data flows one way (see `ARCHITECTURE` in the README): a manifest is
//! parsed ([`manifest`]), its sources resolved ([`source`]) and planned ([`job::plan`]), copied and
//! hashed into a temporary output ([`job`], [`checksum`], [`output`]) and published; the daemon
//! ([`daemon`]) feeds jobs from watched folders and files their [`result`]s.

pub mod api;
pub mod checksum;
pub mod cli;
pub mod commands;
pub mod config;
pub mod crash;
pub mod daemon;
pub mod inbox;
pub mod job;
pub mod logging;
pub mod manifest;
pub mod metrics;
pub mod output;
pub mod redact;
pub mod result;
pub mod source;
pub mod yaml;
