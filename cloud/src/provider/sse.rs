//! Server-sent events (`text/event-stream`, the HTML standard's "event stream interpretation")
//! read incrementally from the byte chunks of an HTTP body, with a bound on the memory one event
//! may take.
//!
//! This module owns the wire format only: lines (ended by CRLF, LF or CR, including a CRLF split
//! across two chunks), `data:` lines joined with `\n`, `event:` names, `:` comments, one leading
//! space after the colon stripped, a leading byte-order mark ignored. `id:` and `retry:` are read
//! and ignored (nothing here reconnects). What an event *means* is the providers' business
//! ([`super::openai`], [`super::anthropic`]).
//!
//! Why not `eventsource-stream` (0.2.3): it keeps the partial line and the data buffer in
//! `String`s that grow without limit, so an upstream that never sends a newline grows our memory
//! without bound, and it parses the buffered partial line again on every chunk (quadratic on a
//! long line). This parser scans each byte once and refuses an event (its partial line, its data
//! and its name together) above a fixed size: [`SseError::TooLong`].

/// The most bytes one event may hold while it is read (partial line + data + event name):
/// 1 MiB. A chat chunk is a few hundred bytes.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, or `"message"` when the event had none.
    pub event: String,
    /// The `data:` lines joined with `\n` (without a final `\n`).
    pub data: String,
}

/// Why a stream cannot be read further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// One event grew past the limit before it ended.
    #[error("an event in the stream is larger than {limit} bytes")]
    TooLong { limit: usize },
}

/// An incremental parser: feed it the body's chunks in order with [`SseParser::push`].
///
/// After an error it must not be fed again (the stream is broken; the caller drops it).
#[derive(Debug)]
pub struct SseParser {
    limit: usize,
    /// The line being read (bytes: a UTF-8 character may be split across chunks).
    line: Vec<u8>,
    /// The data buffer of the event being read.
    data: String,
    /// The event type buffer of the event being read.
    event: String,
    /// The last byte seen was a CR: a LF right after it belongs to the same line end.
    after_cr: bool,
    /// No line has ended yet (a byte-order mark may start the first one).
    first_line: bool,
}

impl Default for SseParser {
    fn default() -> Self {
        SseParser::new(MAX_EVENT_BYTES)
    }
}

impl SseParser {
    /// A parser refusing events larger than `limit` bytes.
    pub fn new(limit: usize) -> SseParser {
        SseParser {
            limit,
            line: Vec::new(),
            data: String::new(),
            event: String::new(),
            after_cr: false,
            first_line: true,
        }
    }

    /// Reads `chunk` and appends the events it completes to `out`, in order.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        let mut rest = chunk;
        while let Some((&first, tail)) = rest.split_first() {
            if self.after_cr {
                self.after_cr = false;
                if first == b'\n' {
                    rest = tail;
                    continue;
                }
            }
            match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
                None => {
                    self.extend_line(rest)?;
                    break;
                }
                Some(end) => {
                    self.extend_line(&rest[..end])?;
                    self.after_cr = rest[end] == b'\r';
                    rest = &rest[end + 1..];
                    self.end_line(out)?;
                }
            }
        }
        Ok(())
    }

    /// Bytes held for the event being read.
    fn held(&self) -> usize {
        self.line.len() + self.data.len() + self.event.len()
    }

    fn extend_line(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        if self.held().saturating_add(bytes.len()) > self.limit {
            return Err(SseError::TooLong { limit: self.limit });
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        let bytes = std::mem::take(&mut self.line);
        let decoded = String::from_utf8_lossy(&bytes);
        let mut line: &str = &decoded;
        if self.first_line {
            self.first_line = false;
            line = line.strip_prefix('\u{FEFF}').unwrap_or(line);
        }
        if line.is_empty() {
            self.dispatch(out);
            return Ok(());
        }
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => {
                self.event.clear();
                self.event.push_str(value);
            }
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            // `id`, `retry` and unknown fields: nothing here uses them.
            _ => {}
        }
        // Lossy decoding may have grown the line (a replacement character is 3 bytes).
        if self.held() > self.limit {
            return Err(SseError::TooLong { limit: self.limit });
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let event = std::mem::take(&mut self.event);
        if self.data.is_empty() {
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop(); // the last `\n` (every data line ends with one)
        out.push(SseEvent {
            event: if event.is_empty() {
                "message".to_owned()
            } else {
                event
            },
            data,
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(input: &[u8]) -> Vec<SseEvent> {
        let mut parser = SseParser::default();
        let mut out = Vec::new();
        parser.push(input, &mut out).unwrap();
        out
    }

    fn ev(event: &str, data: &str) -> SseEvent {
        SseEvent {
            event: event.to_owned(),
            data: data.to_owned(),
        }
    }

    #[test]
    fn fields_comments_and_multiline_data() {
        let input = b": a comment\n\
            event: message_start\n\
            data: {\"a\":1}\n\
            \n\
            data: first\n\
            data:second\n\
            data:  two spaces\n\
            id: 7\n\
            retry: 1000\n\
            unknown: x\n\
            \n";
        assert_eq!(
            parse(input),
            vec![
                ev("message_start", "{\"a\":1}"),
                ev("message", "first\nsecond\n two spaces"),
            ]
        );
    }

    #[test]
    fn crlf_cr_and_lf_all_end_lines() {
        let expected = vec![ev("e", "a\nb"), ev("message", "c")];
        assert_eq!(
            parse(b"event: e\r\ndata: a\r\ndata: b\r\n\r\ndata: c\r\n\r\n"),
            expected
        );
        assert_eq!(
            parse(b"event: e\rdata: a\rdata: b\r\rdata: c\r\r"),
            expected
        );
        assert_eq!(
            parse(b"event: e\ndata: a\ndata: b\n\ndata: c\n\n"),
            expected
        );
        assert_eq!(
            parse(b"event: e\r\ndata: a\rdata: b\n\rdata: c\n\r\n"),
            expected
        );
    }

    #[test]
    fn every_split_of_the_input_gives_the_same_events() {
        let input = "\u{FEFF}event: x\r\ndata: héllo\r\n: keepalive\r\n\r\ndata: [DONE]\r\n\r\n";
        let expected = vec![ev("x", "héllo"), ev("message", "[DONE]")];
        let bytes = input.as_bytes();
        for cut in 0..=bytes.len() {
            let mut parser = SseParser::default();
            let mut out = Vec::new();
            parser.push(&bytes[..cut], &mut out).unwrap();
            parser.push(&bytes[cut..], &mut out).unwrap();
            assert_eq!(out, expected, "split at {cut}");
        }
        let mut parser = SseParser::default();
        let mut out = Vec::new();
        for b in bytes {
            parser.push(std::slice::from_ref(b), &mut out).unwrap();
        }
        assert_eq!(out, expected, "byte by byte");
    }

    #[test]
    fn events_without_data_are_not_dispatched_and_empty_data_is() {
        assert_eq!(parse(b"event: ping\n\n"), vec![]);
        assert_eq!(parse(b"data\n\n"), vec![ev("message", "")]);
        assert_eq!(parse(b"data:\n\n"), vec![ev("message", "")]);
        // The event name does not leak into the next event.
        assert_eq!(parse(b"event: a\n\ndata: x\n\n"), vec![ev("message", "x")]);
    }

    #[test]
    fn an_event_not_ended_is_not_dispatched() {
        assert_eq!(parse(b"data: partial\n"), vec![]);
        assert_eq!(parse(b"data: partial"), vec![]);
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        assert_eq!(
            parse(b"data: a\xffb\n\n"),
            vec![ev("message", "a\u{FFFD}b")]
        );
    }

    #[test]
    fn a_line_without_end_is_bounded() {
        let mut parser = SseParser::new(1024);
        let mut out = Vec::new();
        parser.push(b"data: ", &mut out).unwrap();
        let chunk = [b'x'; 100];
        let mut result = Ok(());
        for _ in 0..20 {
            result = parser.push(&chunk, &mut out);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(SseError::TooLong { limit: 1024 }));
        assert!(out.is_empty());
    }

    #[test]
    fn many_data_lines_are_bounded() {
        let mut parser = SseParser::new(1024);
        let mut out = Vec::new();
        let line = format!("data: {}\n", "y".repeat(90));
        let mut result = Ok(());
        for _ in 0..20 {
            result = parser.push(line.as_bytes(), &mut out);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(SseError::TooLong { limit: 1024 }));
    }

    #[test]
    fn the_bound_is_per_event_not_per_stream() {
        let mut parser = SseParser::new(256);
        let mut out = Vec::new();
        let event = format!("data: {}\n\n: keepalive\n", "z".repeat(200));
        for _ in 0..100 {
            parser.push(event.as_bytes(), &mut out).unwrap();
        }
        assert_eq!(out.len(), 100);
        // Comments never accumulate.
        for _ in 0..1000 {
            parser.push(b": ping ping ping\n", &mut out).unwrap();
        }
    }
}
