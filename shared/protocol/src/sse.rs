//! The SSE wire format: an encoder that no field value can break, and a parser
//! that follows the WHATWG "event stream interpretation" algorithm.
//!
//! Frames Herald writes:
//! ```text
//! id: 18c3f2a1-42
//! event: user-update
//! data: first line
//! data: second line
//!
//! ```
//! Every line break in the data (LF, CR or CRLF) starts a new `data:` line, so a
//! conforming client reads the data back with its line breaks as LF. The `id`
//! and `event` values are validated types ([`EventId`], [`EventType`]) that
//! cannot contain a line break. Every event carries at least one `data:` line, so
//! even an event with empty data is dispatched by browsers.

use bytes::{BufMut, BytesMut};

use crate::{EventId, EventType};

/// Appends one event frame to `buf`.
pub fn write_event(
    buf: &mut BytesMut,
    id: Option<&EventId>,
    event_type: Option<&EventType>,
    data: &str,
) {
    buf.reserve(data.len() + 64);
    if let Some(id) = id {
        buf.put_slice(b"id: ");
        // An id is digits, hex and one dash: no line break possible.
        buf.put_slice(id.encode().as_bytes());
        buf.put_u8(b'\n');
    }
    if let Some(event_type) = event_type {
        buf.put_slice(b"event: ");
        buf.put_slice(event_type.as_str().as_bytes());
        buf.put_u8(b'\n');
    }
    for line in lines(data) {
        buf.put_slice(b"data: ");
        buf.put_slice(line.as_bytes());
        buf.put_u8(b'\n');
    }
    buf.put_u8(b'\n');
}

/// Appends a comment line (ignored by clients; used for heartbeats). Line
/// breaks in `text` are replaced by spaces.
pub fn write_comment(buf: &mut BytesMut, text: &str) {
    buf.put_slice(b": ");
    for line in lines(text).enumerate() {
        if line.0 > 0 {
            buf.put_u8(b' ');
        }
        buf.put_slice(line.1.as_bytes());
    }
    buf.put_slice(b"\n\n");
}

/// Appends a `retry:` field telling the client how long to wait before
/// reconnecting, in milliseconds.
pub fn write_retry(buf: &mut BytesMut, millis: u64) {
    let _ = std::fmt::Write::write_fmt(
        &mut BytesMutWriter(buf),
        format_args!("retry: {millis}\n\n"),
    );
}

/// Splits on LF, CR and CRLF, as the SSE parser does. Always yields at least
/// one (possibly empty) line.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.find(['\r', '\n']) {
            None => {
                rest = None;
                Some(current)
            }
            Some(at) => {
                let skip = if current[at..].starts_with("\r\n") {
                    2
                } else {
                    1
                };
                rest = Some(&current[at + skip..]);
                Some(&current[..at])
            }
        }
    })
}

struct BytesMutWriter<'a>(&'a mut BytesMut);

impl std::fmt::Write for BytesMutWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.put_slice(s.as_bytes());
        Ok(())
    }
}

/// One item read from an event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A dispatched event.
    Event(ParsedEvent),
    /// A comment line (without the leading colon and one space).
    Comment(String),
    /// A valid `retry:` field, in milliseconds.
    Retry(u64),
}

/// An event as a conforming client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedEvent {
    /// The last event id in force when the event was dispatched.
    pub id: String,
    /// The event type (`message` when none was given).
    pub event_type: String,
    /// The data, lines joined with LF.
    pub data: String,
}

/// An incremental, spec-conformant SSE parser (WHATWG HTML, "Interpreting an
/// event stream"). Feed it bytes as they arrive; it returns what completed.
#[derive(Debug, Default)]
pub struct Parser {
    line: Vec<u8>,
    after_cr: bool,
    started: bool,
    data: String,
    event_type: String,
    last_id: String,
}

impl Parser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last event id seen, as a browser would send it on reconnect.
    pub fn last_event_id(&self) -> &str {
        &self.last_id
    }

    /// Feeds bytes, returning every item they complete.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Vec<Item> {
        let mut items = Vec::new();
        if !self.started && !bytes.is_empty() {
            self.started = true;
            if let Some(rest) = bytes.strip_prefix("\u{feff}".as_bytes()) {
                bytes = rest;
            }
        }
        for &byte in bytes {
            match byte {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    self.after_cr = byte == b'\r';
                    let line = std::mem::take(&mut self.line);
                    self.process_line(&String::from_utf8_lossy(&line), &mut items);
                }
                _ => {
                    self.after_cr = false;
                    self.line.push(byte);
                }
            }
        }
        items
    }

    fn process_line(&mut self, line: &str, items: &mut Vec<Item>) {
        if line.is_empty() {
            self.dispatch(items);
            return;
        }
        if let Some(comment) = line.strip_prefix(':') {
            let comment = comment.strip_prefix(' ').unwrap_or(comment);
            items.push(Item::Comment(comment.to_owned()));
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => self.event_type = value.to_owned(),
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            "id" if !value.contains('\0') => self.last_id = value.to_owned(),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                if let Ok(millis) = value.parse() {
                    items.push(Item::Retry(millis));
                }
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, items: &mut Vec<Item>) {
        let event_type = std::mem::take(&mut self.event_type);
        if self.data.is_empty() {
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        if data.ends_with('\n') {
            data.pop();
        }
        items.push(Item::Event(ParsedEvent {
            id: self.last_id.clone(),
            event_type: if event_type.is_empty() {
                "message".to_owned()
            } else {
                event_type
            },
            data,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Epoch;
    use proptest::prelude::*;

    fn encode(id: u64, event_type: Option<&str>, data: &str) -> BytesMut {
        let mut buf = BytesMut::new();
        let id = EventId {
            epoch: Epoch(7),
            seq: id,
        };
        let event_type = event_type.map(|t| EventType::new(t).expect("valid"));
        write_event(&mut buf, Some(&id), event_type.as_ref(), data);
        buf
    }

    fn events(items: Vec<Item>) -> Vec<ParsedEvent> {
        items
            .into_iter()
            .filter_map(|item| match item {
                Item::Event(event) => Some(event),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_frame_has_id_event_and_one_data_line_per_line() {
        let frame = encode(3, Some("update"), "a\nb\r\nc\rd");
        assert_eq!(
            &frame[..],
            b"id: 7-3\nevent: update\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
        );
    }

    #[test]
    fn an_injection_attempt_in_data_stays_data() {
        let frame = encode(1, None, "x\n\nid: 999\nevent: evil\ndata: y");
        let parsed = events(Parser::new().feed(&frame));
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].id, "7-1");
        assert_eq!(parsed[0].event_type, "message");
        assert_eq!(parsed[0].data, "x\n\nid: 999\nevent: evil\ndata: y");
    }

    #[test]
    fn empty_data_is_still_dispatched() {
        let parsed = events(Parser::new().feed(&encode(1, None, "")));
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].data, "");
    }

    #[test]
    fn comments_and_retry_are_reported_and_crlf_split_across_chunks_is_one_break() {
        let mut parser = Parser::new();
        let mut buf = BytesMut::new();
        write_comment(&mut buf, "heartbeat\nsecond");
        write_retry(&mut buf, 2500);
        let mut items = parser.feed(&buf);
        items.extend(parser.feed(b"data: a\r"));
        items.extend(parser.feed(b"\ndata: b\r\n\r\n"));
        assert_eq!(
            items,
            vec![
                Item::Comment("heartbeat second".into()),
                Item::Retry(2500),
                Item::Event(ParsedEvent {
                    id: String::new(),
                    event_type: "message".into(),
                    data: "a\nb".into()
                }),
            ]
        );
    }

    proptest! {
        #[test]
        fn a_conforming_parser_reads_back_exactly_what_was_written(
            frames in proptest::collection::vec((any::<u32>(), proptest::option::of("[a-z][a-z0-9.-]{0,15}"), any::<String>()), 1..8),
            split in any::<prop::sample::Index>(),
        ) {
            let mut wire = BytesMut::new();
            let mut expected = Vec::new();
            for (seq, event_type, data) in &frames {
                let event_type = event_type.as_deref().filter(|t| !t.starts_with("herald."));
                wire.extend_from_slice(&encode(u64::from(*seq), event_type, data));
                expected.push(ParsedEvent {
                    id: format!("7-{seq}"),
                    event_type: event_type.unwrap_or("message").to_owned(),
                    data: data.replace("\r\n", "\n").replace('\r', "\n"),
                });
            }
            // Deliver the bytes in two chunks split at an arbitrary point.
            let at = split.index(wire.len() + 1);
            let mut parser = Parser::new();
            let mut items = parser.feed(&wire[..at]);
            items.extend(parser.feed(&wire[at..]));
            prop_assert_eq!(events(items), expected);
        }

        #[test]
        fn the_parser_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Parser::new().feed(&bytes);
        }
    }
}
