//! Tests only: `tests/patches.rs` runs every micropatch of the library in `patches/`
//! against the exact, unmodified package it targets, on a live process.
#![forbid(unsafe_code)]
