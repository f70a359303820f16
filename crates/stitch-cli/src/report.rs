//! How errors reach the user: a stable code in brackets, then the message chain.

use stitch_build::BuildError;
use stitch_format::FormatError;

/// The stable code of the innermost typed error, if any.
pub(crate) fn code_of(e: &anyhow::Error) -> &'static str {
    // A typed error used as context is only visible through `downcast_ref` on the error itself.
    if let Some(c) = e.downcast_ref::<crate::commands::CliError>() {
        return c.code();
    }
    for cause in e.chain() {
        if let Some(f) = cause.downcast_ref::<FormatError>() {
            return f.code();
        }
        if let Some(b) = cause.downcast_ref::<BuildError>() {
            return b.code();
        }
        if let Some(e) = cause.downcast_ref::<stitch_engine::EngineError>() {
            return e.code();
        }
        if let Some(c) = cause.downcast_ref::<crate::commands::CliError>() {
            return c.code();
        }
    }
    "cli.error"
}

pub(crate) fn print_error(e: &anyhow::Error) {
    eprintln!("error[{}]: {e}", code_of(e));
    for cause in e.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}
