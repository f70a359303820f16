//! The bundle decoder reads untrusted bytes from the network and from disk: it must never
//! panic, and whatever it accepts must re-encode to exactly the same bytes (canonical form).
#![no_main]

use libfuzzer_sys::fuzz_target;
use stitch_format::{Bundle, SecretKey, TrustedKeys};

fuzz_target!(|data: &[u8]| {
    if let Ok(bundle) = Bundle::decode(data) {
        assert_eq!(bundle.encode(), data, "accepted bytes must be canonical");
        let mut trusted = TrustedKeys::new();
        trusted.insert(SecretKey::from_seed([1; 32]).public());
        let _ = bundle.verify(&trusted);
    }
});
