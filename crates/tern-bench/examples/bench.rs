//! `cargo run -p tern-bench --example bench -- run --set quick` — the benchmark without the
//! `tern` binary (same arguments as `tern bench`).

use clap::Parser;

#[derive(Parser)]
#[command(name = "bench", about = "tern bench without the tern binary")]
struct Cli {
    #[command(flatten)]
    bench: tern_bench::BenchArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let code = tern_bench::run(cli.bench).await?;
    std::process::exit(code);
}
