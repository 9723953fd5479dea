//! aigateway data plane.
//!
//! The hot path, in the order a request takes it: [`listener`] → [`conn`] → [`h1`] (the
//! sans-I/O codec) → the handler → the response. [`worker`] owns one core; [`server`] starts
//! the workers and the [`admin`] listener.

pub mod h1;
