//! Credentials compatible with Django: `pbkdf2_sha256` password hashes and
//! djangorestframework-simplejwt HS256 access tokens. Free of any web framework.

pub mod jwt;
pub mod password;
