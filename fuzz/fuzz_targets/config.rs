//! Per-network TOML config files: any text parses or yields an error naming the problem, and
//! a parsed config written back out parses to the same file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use meshvpn::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/meshvpn/fuzz.toml");
    match Config::parse(text, path) {
        Ok(config) => {
            let written = config.to_toml();
            let again = Config::parse(&written, path).expect("a written config parses");
            assert_eq!(again.to_toml(), written);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
