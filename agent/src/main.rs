//! The `hotplug-agent` binary: parses the command line and runs the library's command.
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = hotplug_agent::cli::parse();
    match hotplug_agent::app::main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {}", hotplug_agent::sources::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
