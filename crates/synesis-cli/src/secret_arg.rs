//! Secrets given on the command line — setup tokens, invitation codes, vouchers — are visible
//! to every user of the machine (`/proc/PID/cmdline`, `ps`) until the command ends. `-` in
//! their place reads them from standard input instead: piped from a file, or pasted.

use std::io::{BufRead, IsTerminal, Write};

use crate::exit::UserError;

/// The argument that says "read it from standard input".
pub(crate) const FROM_STDIN: &str = "-";
/// A line longer than any secret we take (a setup token is a few hundred bytes).
const SECRET_LINE_BYTES_MAX: u64 = 64 * 1024;

/// `value` itself, or, when it is `-`, the first line of standard input (trimmed). On a
/// terminal it asks for it first, naming `what`.
pub(crate) fn secret_arg(value: &str, what: &str) -> Result<String, UserError> {
    if value != FROM_STDIN {
        return Ok(value.to_owned());
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("paste the {what}, then Enter: ");
        let _ = std::io::stderr().flush();
    }
    read_secret_line(stdin.lock(), what)
}

fn read_secret_line(input: impl BufRead, what: &str) -> Result<String, UserError> {
    let mut line = String::new();
    input
        .take(SECRET_LINE_BYTES_MAX)
        .read_line(&mut line)
        .map_err(|e| {
            UserError::Usage(format!("cannot read the {what} from standard input: {e}"))
        })?;
    let secret = line.trim();
    if secret.is_empty() {
        return Err(UserError::Usage(format!(
            "no {what} on standard input (`-` reads it from there)"
        )));
    }
    Ok(secret.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code

    use super::*;

    #[test]
    fn the_first_line_is_the_secret_and_an_empty_one_is_refused() {
        let read = |text: &str| read_secret_line(text.as_bytes(), "voucher");
        assert_eq!(read("VCH-1\nmore\n").unwrap(), "VCH-1");
        assert_eq!(read("  VCH-2  \r\n").unwrap(), "VCH-2");
        assert!(read("").unwrap_err().to_string().contains("no voucher"));
        assert!(read("\n").is_err());
        assert_eq!(secret_arg("VCH-3", "voucher").unwrap(), "VCH-3");
    }
}
