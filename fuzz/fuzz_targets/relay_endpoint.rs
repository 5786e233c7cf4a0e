//! `KEY@HOST:PORT` relay endpoints from the command line and config files: anything parses or
//! is refused, and a parsed endpoint prints back to text that parses to the same endpoint.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshvpn::wire::token::{split_host_port, validate_network_name, RelayEndpoint};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = split_host_port(&text);
    let _ = validate_network_name(&text);
    if let Ok(endpoint) = text.parse::<RelayEndpoint>() {
        let _ = endpoint.host_port();
        let printed = endpoint.to_string();
        assert_eq!(
            printed.parse::<RelayEndpoint>().as_ref(),
            Ok(&endpoint),
            "{printed:?} must parse back"
        );
    }
});
