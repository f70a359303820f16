//! /proc/PID/maps of arbitrary processes (paths chosen by whoever created the files).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stitch_elf::fuzz::maps(data));
