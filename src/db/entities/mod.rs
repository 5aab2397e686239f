//! sea-orm entities, one module per table. Never serialized directly into a response.

pub mod api_key;
pub mod auth_user;
pub mod usage;
