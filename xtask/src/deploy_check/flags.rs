//! The binaries' command lines, parsed by their own clap definitions, and the quantities and
//! durations manifests write.

#[allow(clippy::wildcard_imports)]
use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Daemon {
    Ingest,
    Uploader,
    /// `uploader drain`: the one-shot subcommand.
    Drain,
}

impl Daemon {
    pub(super) fn label(self) -> &'static str {
        match self {
            Daemon::Ingest => "ingest",
            Daemon::Uploader => "uploader",
            Daemon::Drain => "uploader drain",
        }
    }
}

/// The parsed command line of one container: every flag's effective raw values (given or
/// default) by long name, and which were given.
#[derive(Debug, Default)]
pub(super) struct Flags {
    pub(super) values: BTreeMap<String, Vec<String>>,
    pub(super) given: BTreeSet<String>,
}

impl Flags {
    pub(super) fn get(&self, long: &str) -> Option<&str> {
        self.values
            .get(long)
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    pub(super) fn all(&self, long: &str) -> &[String] {
        self.values.get(long).map_or(&[], Vec::as_slice)
    }
}

/// The binary's clap command with every environment fallback removed, so that only the
/// manifest's own arguments (and the variables it sets, added as arguments) are parsed.
pub(super) fn clap_command(daemon: Daemon) -> clap::Command {
    let strip = |a: clap::Arg| a.env(None::<&'static str>);
    let cmd = match daemon {
        Daemon::Ingest => spillway_ingest::Args::command(),
        Daemon::Uploader | Daemon::Drain => spillway_uploader::Args::command(),
    };
    cmd.mut_args(strip)
        .mut_subcommands(move |s| s.mut_args(strip))
}

/// The `SPILLWAY_*` variable of every argument of the daemon (its subcommand's too), by
/// variable, with the argument's long name.
pub(super) fn clap_env(daemon: Daemon) -> BTreeMap<String, String> {
    let cmd = match daemon {
        Daemon::Ingest => spillway_ingest::Args::command(),
        Daemon::Uploader | Daemon::Drain => spillway_uploader::Args::command(),
    };
    let sub = match daemon {
        Daemon::Drain => cmd.find_subcommand("drain").cloned(),
        _ => None,
    };
    let mut out = BTreeMap::new();
    for c in std::iter::once(&cmd).chain(sub.as_ref()) {
        for a in c.get_arguments() {
            if let (Some(env), Some(long)) = (a.get_env(), a.get_long()) {
                out.insert(env.to_string_lossy().into_owned(), long.to_owned());
            }
        }
    }
    out
}

/// Parses a container's command line (plus the literal `SPILLWAY_*` variables it sets) with the
/// binary's own parser.
pub(super) fn parse_command_line(
    daemon: Daemon,
    args: &[String],
    env: &[(String, Option<String>)],
) -> std::result::Result<Flags, String> {
    let mut cmd = clap_command(daemon);
    if daemon == Daemon::Drain && cmd.find_subcommand("drain").is_none() {
        return Err(
            "the uploader has no `drain` subcommand (spillway_uploader::Args defines none)".into(),
        );
    }
    let env_flags = clap_env(daemon);
    let mut flags = Flags::default();
    let mut argv: Vec<String> = vec![cmd.get_name().to_owned()];
    argv.extend(args.iter().cloned());
    let given_long: BTreeSet<String> = args
        .iter()
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_owned())
        .collect();
    let sub = if daemon == Daemon::Drain {
        cmd.find_subcommand("drain").cloned()
    } else {
        None
    };
    let scope = sub.clone().unwrap_or_else(|| cmd.clone());
    for (name, value) in env {
        let Some(long) = env_flags.get(name) else {
            if name.starts_with("SPILLWAY_") {
                return Err(format!(
                    "env {name} is not read by {} (no argument has it as its variable)",
                    daemon.label()
                ));
            }
            continue;
        };
        if given_long.contains(long) {
            return Err(format!(
                "env {name} and --{long} are both set; the flag wins, so the variable is dead configuration"
            ));
        }
        let Some(value) = value else { continue };
        let takes_no_value = scope.get_arguments().any(|a| {
            a.get_long() == Some(long.as_str())
                && matches!(
                    a.get_action(),
                    clap::ArgAction::SetTrue | clap::ArgAction::SetFalse | clap::ArgAction::Count
                )
        });
        if takes_no_value {
            if matches!(value.as_str(), "true" | "1" | "yes" | "on") {
                argv.push(format!("--{long}"));
            }
        } else {
            argv.push(format!("--{long}={value}"));
        }
    }
    let matches = cmd.try_get_matches_from_mut(&argv).map_err(|e| {
        let text = e.to_string();
        let first = text.lines().next().unwrap_or("").trim();
        format!(
            "`{}` is refused by the binary's parser: {}",
            argv.join(" "),
            first.trim_start_matches("error: ")
        )
    })?;
    let (matches, scope) = match daemon {
        Daemon::Drain => match (matches.subcommand_matches("drain"), sub) {
            (Some(m), Some(s)) => (m.clone(), s),
            _ => {
                return Err(format!(
                    "`{}` does not run the drain subcommand (its first argument must be `drain`)",
                    argv.join(" ")
                ));
            }
        },
        _ => {
            if let Some((name, _)) = matches.subcommand() {
                return Err(format!(
                    "`{}` runs the `{name}` subcommand, not the daemon",
                    argv.join(" ")
                ));
            }
            (matches, cmd)
        }
    };
    for a in scope.get_arguments() {
        let (Some(long), id) = (a.get_long(), a.get_id().as_str()) else {
            continue;
        };
        let raw: Vec<String> = matches
            .try_get_raw(id)
            .ok()
            .flatten()
            .map(|r| r.map(|s| s.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        if matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
            flags.given.insert(long.to_owned());
        }
        flags.values.insert(long.to_owned(), raw);
    }
    Ok(flags)
}

/// Bytes of a Kubernetes quantity such as `1536Mi`, `48Gi`, `500M` or `1e9`, rounded up.
pub(super) fn quantity_bytes(q: &Value) -> Option<u128> {
    let s = match q {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let mantissa: u128 = format!("{int}{frac}").parse().ok()?;
    let scale = 10u128.checked_pow(u32::try_from(frac.len()).ok()?)?;
    let multiplier: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        e if e.starts_with(['e', 'E']) => 10u128.checked_pow(e[1..].parse().ok()?)?,
        _ => return None,
    };
    Some((mantissa * multiplier).div_ceil(scale))
}

pub(super) fn duration_secs(s: &str) -> Option<f64> {
    humantime::parse_duration(s).ok().map(|d| d.as_secs_f64())
}
