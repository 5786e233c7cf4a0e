//! Group tokens as typed or pasted by a user: any text decodes or is refused, and a token that
//! decodes survives an encode/decode round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshvpn::wire::token::Token;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(token) = Token::decode(&text) {
        let again = Token::decode(&token.encode());
        assert_eq!(again.as_ref(), Ok(&token), "token round trip");
    }
});
