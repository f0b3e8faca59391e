//! `CLUSTER_CHECK_CONFIG=1`: the settings a program would run with, and every problem with
//! them, without starting anything.

use std::io::Write;

use crate::env::{ErrorChain, program_name};
use crate::settings::Settings;

/// Whether this run only checks its configuration ([`crate::env::CHECK_CONFIG`]).
pub(crate) fn asked() -> bool {
    std::env::var_os(crate::env::CHECK_CONFIG).is_some_and(|v| v == "1")
}

/// Prints the settings in force on stdout and every problem on stderr (one line each), then
/// exits: 0 without a problem, 78 (`EX_CONFIG`) with any. `settings` are the program's own,
/// before the environment is applied.
pub(crate) fn check_and_exit(settings: Settings) -> ! {
    let program = program_name();
    let mut problems: Vec<String> = Vec::new();
    let settings = if settings.env_overrides {
        // Under the check a misspelt variable is an error: the operator asked what is wrong.
        problems.extend(
            crate::env::unknown_variables(std::env::vars_os().map(|(name, _)| name))
                .iter()
                .map(ToString::to_string),
        );
        let (settings, errors) = settings.apply_env_all(|name| std::env::var_os(name));
        problems.extend(errors.iter().map(ToString::to_string));
        settings
    } else {
        settings
    };
    if let Err(error) = settings.validate() {
        problems.push(error.to_string());
    }
    if let Err(error) = crate::sys::check_process_limit(settings.worker_count()) {
        problems.push(error.to_string());
    }
    if let Err(error) = crate::primary::Image::first(settings.exec.as_deref()) {
        let program = settings.exec.as_deref().map_or_else(
            || "this program".to_owned(),
            |path| path.display().to_string(),
        );
        problems.push(format!(
            "the workers' program {program} cannot be run: {}",
            ErrorChain(&error)
        ));
    }
    let in_force = settings.in_force();
    let width = in_force.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let values = in_force.iter().map(|s| s.value.len()).max().unwrap_or(0);
    let mut out = format!(
        "{program}: cluster {}, protocol {}; the settings in force:\n",
        env!("CARGO_PKG_VERSION"),
        crate::env::PROTOCOL_VERSION
    );
    for setting in &in_force {
        out.push_str(&format!(
            "  {:width$}  {:values$}  ({})\n",
            setting.name, setting.value, setting.source
        ));
    }
    out.push_str(&match problems.len() {
        0 => "no problem found\n".to_owned(),
        1 => "1 problem\n".to_owned(),
        n => format!("{n} problems\n"),
    });
    let mut err = String::new();
    for problem in &problems {
        err.push_str(&format!("{program}: configuration error: {problem}\n"));
    }
    // Not `println!`, which panics when stdout is closed.
    let _ = std::io::stdout().write_all(out.as_bytes());
    let _ = std::io::stderr().write_all(err.as_bytes());
    std::process::exit(if problems.is_empty() {
        0
    } else {
        proto::supervisor::FATAL_EXIT_CODE
    })
}
