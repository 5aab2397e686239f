//! sea-orm entities, one module per table. Never serialized directly into a response.

pub mod auth_user;
pub mod usage;
