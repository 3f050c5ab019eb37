//! The provider-response parser: a 200 body into a completion (or the
//! reason it is not one), and an error body into its type and message.
//! Nothing may panic, a completion always has output, messages stay bounded.
#![no_main]

use batchd_actors::codec::MAX_MESSAGE_CHARS;
use batchd_actors::completion::{parse_chat_completion, parse_error_body};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_chat_completion(data) {
        Ok(c) => assert!(c.output.is_some()),
        Err(message) => assert!(message.chars().count() <= MAX_MESSAGE_CHARS),
    }
    let (_, message) = parse_error_body(data);
    assert!(message.chars().count() <= MAX_MESSAGE_CHARS);
});
