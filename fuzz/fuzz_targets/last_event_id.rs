//! Parsing a `Last-Event-ID` never panics, and an id that parses prints back
//! as the same text.
#![no_main]

use herald_protocol::EventId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    if let Ok(id) = input.parse::<EventId>() {
        assert_eq!(id.to_string().parse::<EventId>(), Ok(id));
    }
});
