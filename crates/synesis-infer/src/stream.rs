//! Token bytes to text: llama.cpp hands out raw bytes per token (a byte-fallback token is one
//! byte of a multi-byte character), and stop strings may straddle tokens. This buffers both ways:
//! only whole UTF-8 characters are emitted, and text that could be the start of a stop string is
//! held back until it is known not to be.

#[derive(Debug)]
pub(crate) struct TextStream<'a> {
    stop: &'a [String],
    /// Bytes of an incomplete UTF-8 character.
    pending: Vec<u8>,
    /// All decoded text; `emitted` bytes of it were handed out.
    text: String,
    emitted: usize,
}

impl<'a> TextStream<'a> {
    pub(crate) fn new(stop: &'a [String]) -> TextStream<'a> {
        TextStream {
            stop,
            pending: Vec::new(),
            text: String::new(),
            emitted: 0,
        }
    }

    /// Adds a token's bytes; emits what is safe. Returns true when a stop string was reached
    /// (the text is cut before it).
    pub(crate) fn push(&mut self, bytes: &[u8], emit: &mut dyn FnMut(&str)) -> bool {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_some() => {
                // Invalid bytes (not just incomplete): replace them rather than stall forever.
                let s = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                self.text.push_str(&s);
                return self.settle(emit);
            }
            Err(e) => e.valid_up_to(),
        };
        let complete: Vec<u8> = self.pending.drain(..valid).collect();
        self.text
            .push_str(std::str::from_utf8(&complete).unwrap_or_default());
        self.settle(emit)
    }

    fn settle(&mut self, emit: &mut dyn FnMut(&str)) -> bool {
        let search_from = self.emitted.saturating_sub(self.longest_stop());
        let search_from = floor_char_boundary(&self.text, search_from);
        if let Some(at) = self
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| {
                self.text[search_from..]
                    .find(s.as_str())
                    .map(|i| search_from + i)
            })
            .min()
        {
            self.text.truncate(at);
            self.flush(emit);
            return true;
        }
        // Hold back what could still turn into a stop string.
        let hold = self.longest_stop().saturating_sub(1);
        let safe =
            floor_char_boundary(&self.text, self.text.len().saturating_sub(hold)).max(self.emitted);
        if safe > self.emitted {
            emit(&self.text[self.emitted..safe]);
            self.emitted = safe;
        }
        false
    }

    fn longest_stop(&self) -> usize {
        self.stop.iter().map(String::len).max().unwrap_or(0)
    }

    fn flush(&mut self, emit: &mut dyn FnMut(&str)) {
        if self.text.len() > self.emitted {
            emit(&self.text[self.emitted..]);
            self.emitted = self.text.len();
        }
    }

    /// The end: emits what was held back (a trailing incomplete character becomes U+FFFD).
    pub(crate) fn finish(&mut self, emit: &mut dyn FnMut(&str)) {
        if !self.pending.is_empty() {
            let rest = String::from_utf8_lossy(&self.pending).into_owned();
            self.pending.clear();
            self.text.push_str(&rest);
        }
        self.flush(emit);
    }

    pub(crate) fn into_text(self) -> String {
        self.text
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: &[&[u8]], stop: &[&str]) -> (Vec<String>, String, bool) {
        let stop: Vec<String> = stop.iter().map(|s| (*s).to_owned()).collect();
        let mut stream = TextStream::new(&stop);
        let mut out = Vec::new();
        let mut stopped = false;
        for p in pieces {
            if stream.push(p, &mut |s| out.push(s.to_owned())) {
                stopped = true;
                break;
            }
        }
        stream.finish(&mut |s| out.push(s.to_owned()));
        (out, stream.into_text(), stopped)
    }

    #[test]
    fn a_character_split_across_tokens_is_emitted_whole() {
        let euro = "€".as_bytes(); // e2 82 ac
        let (out, text, _) = run(&[b"a", &euro[..1], &euro[1..2], &euro[2..], b"b"], &[]);
        assert_eq!(text, "a€b");
        assert!(
            out.iter()
                .all(|p| std::str::from_utf8(p.as_bytes()).is_ok())
        );
        assert_eq!(out, ["a", "€", "b"]);
    }

    #[test]
    fn a_stop_string_across_tokens_ends_the_text_before_it() {
        let (out, text, stopped) = run(&[b"hello ", b"wor", b"ld", b"!"], &["world"]);
        assert!(stopped);
        assert_eq!(text, "hello ");
        assert_eq!(out.concat(), "hello ");
    }

    #[test]
    fn held_back_text_is_released_when_it_is_not_a_stop() {
        let (out, text, stopped) = run(&[b"wo", b"ah"], &["world"]);
        assert!(!stopped);
        assert_eq!(text, "woah");
        assert_eq!(out.concat(), "woah");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let (_, text, _) = run(&[b"a", &[0xff], b"b", &[0xe2, 0x82]], &[]);
        assert_eq!(text, "a\u{fffd}b\u{fffd}");
    }
}
