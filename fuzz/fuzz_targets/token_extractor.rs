//! Reading a stream request's token, topics and `Last-Event-ID` from arbitrary
//! headers and query strings never panics.
#![no_main]

use herald_edge::StreamRequest;
use herald_edge::warp_http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, Vec<(&[u8], &[u8])>)| {
    let (query, raw_headers) = input;
    let mut headers = HeaderMap::new();
    for (name, value) in raw_headers {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(name, value);
        }
    }
    let _ = StreamRequest::parse(&headers, query);
});
