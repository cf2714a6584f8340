//! How a program ends on error: one readable line naming the cause, exit code 1, no panic
//! and no backtrace.

use std::fmt::Write as _;

/// The error and its causes on one line, each cause once.
///
/// Some errors repeat their cause in their own message (tokio-postgres does); a cause whose
/// text the line already holds is left out, and line breaks become spaces.
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let flat = |e: &dyn std::error::Error| {
        e.to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut line = flat(e);
    let mut source = e.source();
    while let Some(cause) = source {
        let text = flat(cause);
        if !text.is_empty() && !line.contains(&text) {
            let _ = write!(line, ": {text}");
        }
        source = cause.source();
    }
    line
}

/// Prints `error: <cause>` on stderr and exits with code 1 when `result` is an error.
pub fn on_error(result: anyhow::Result<()>) {
    if let Err(e) = result {
        let chain: &(dyn std::error::Error + 'static) = e.as_ref();
        eprintln!("error: {}", one_line(chain));
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_joined_once_on_one_line() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused\nnow");
        let e = anyhow::Error::new(io)
            .context("connecting to db: refused now")
            .context("starting");
        let chain: &(dyn std::error::Error + 'static) = e.as_ref();
        assert_eq!(one_line(chain), "starting: connecting to db: refused now");
    }
}
