//! Route handlers, one module per area.

pub mod admin;
pub mod health;
