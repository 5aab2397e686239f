//! llm-tracker patch (see `vendor/README.md`): the responses this dispatcher writes on its own,
//! before any service runs (400 for a request it cannot parse, 431 for a head over 128 KiB,
//! 408 for a head that never finished), get their body and headers from a function the
//! application installs once. Without one they stay empty, as upstream.

use std::sync::OnceLock;

use crate::{body::BoxBody, Response};

/// Given the response the dispatcher is about to write (status set, no body), adds headers and
/// returns the body to send with it.
pub type ErrorResponseHook = fn(&mut Response<()>) -> BoxBody;

static HOOK: OnceLock<ErrorResponseHook> = OnceLock::new();

/// Installs the hook for every HTTP/1 connection of this process. Only the first call counts;
/// returns `false` when one was installed before.
pub fn set_error_response_hook(hook: ErrorResponseHook) -> bool {
    HOOK.set(hook).is_ok()
}

/// The body (and headers, added to `res`) for a response the dispatcher writes itself.
pub(crate) fn error_body(res: &mut Response<()>) -> BoxBody {
    match HOOK.get() {
        Some(hook) => hook(res),
        None => BoxBody::new(()),
    }
}
