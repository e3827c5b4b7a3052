//! `cargo run --release -p tern-sim --example sim -- --compare --scenarios 1000 --seed 1`:
//! the same as `tern sim`, for use before the CLI wires it in.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "tern-sim",
    about = "Simulate live migrations and compare policies"
)]
struct Cli {
    #[command(flatten)]
    sim: tern_sim::SimArgs,
}

fn main() {
    let cli = Cli::parse();
    match tern_sim::run(&cli.sim) {
        Ok(text) => print!("{text}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}
