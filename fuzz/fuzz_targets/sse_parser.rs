//! The SSE parser never panics, and whatever the encoder writes for arbitrary
//! data parses back to exactly that data (line breaks normalised to LF).
#![no_main]

use bytes::BytesMut;
use herald_protocol::sse::{Item, Parser, write_event};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = Parser::new().feed(bytes);

    let data = String::from_utf8_lossy(bytes);
    let mut frame = BytesMut::new();
    write_event(&mut frame, None, None, &data);
    let items = Parser::new().feed(&frame);
    let expected = data.replace("\r\n", "\n").replace('\r', "\n");
    match items.as_slice() {
        [Item::Event(event)] => assert_eq!(event.data, expected),
        other => panic!("one event expected, parsed {other:?}"),
    }
});
