//! The `dinomo` command (its subcommands are in `cli/`).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
