//! Decoding a subject token never panics; whatever decodes re-encodes to the
//! same token, and every token uses only the safe alphabet.
#![no_main]

use herald_protocol::{Target, TargetKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    if let Ok(target) = Target::from_token(TargetKind::User, input) {
        assert_eq!(target.token(), input);
    }
    if let Ok(target) = Target::user(input) {
        let token = target.token();
        assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-~".contains(&b)));
        assert_eq!(Target::from_token(TargetKind::User, &token), Ok(target));
    }
});
