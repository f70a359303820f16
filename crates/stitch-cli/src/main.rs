//! `stitch`: the command-line tool for patch authors and operators.
//!
//! Each subcommand lives in `commands/<name>.rs` and turns its arguments into calls on the
//! library crates; this file only parses and reports. Errors print as
//! `error[<stable code>]: <message>` and exit with status 1 (2 for usage errors).
#![forbid(unsafe_code)]

mod cli;
mod commands;
mod report;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    let result = commands::run(cli);
    if let Err(e) = result {
        report::print_error(&e);
        std::process::exit(1);
    }
}
