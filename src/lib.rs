//! mesync: lightweight, filesystem-native cross-machine message sync.
//!
//! # Layout
//!
//! In the order a newcomer should read it:
//!
//! - [`message`]: the message schema, the one validator for types and host ids, file names.
//! - [`spool`]: atomic, durable file queues and group commit; every file mesync writes
//!   goes through it.
//! - [`config`]: flag > environment > config file > default.
//! - [`hub`]: `mesync serve`: the HTTP API ([`hub::api`]) over a store of files
//!   ([`hub::store`]).
//! - [`client`]: the agent's side of the HTTP API.
//! - [`tls`]: rustls configurations for both sides, client-certificate identity, the mini-CA.
//! - [`agent`]: `mesync start`: outbox → hub, hub → inbox, hook runner, housekeeping.
//! - [`hooks`]: running one hook: environment, stdin, timeout, loose-file checks.
//! - [`cli`]: the commands; [`demo`]: `mesync demo`; [`shutdown`]: signals.
//! - [`error`]: the error type; [`shortage`]: telling a lack of space, inodes, quota, a
//!   writable file system or file descriptors from other failures, and tracking it.

pub mod agent;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod error;
pub mod hooks;
pub mod hub;
pub mod message;
pub mod service;
pub mod shortage;
pub mod shutdown;
pub mod spool;
pub mod tls;
