//! Configuration as an operator meets it: settings given to `#[cluster::main(settings = ..)]`
//! reach the primary, `CLUSTER_*` variables override them, and a bad value stops the program at
//! start with exit code 78 and one line naming the variable, before any worker starts.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

/// The settings fixture, with `env` added to this process's environment (every `CLUSTER_*`
/// variable of this process removed first, so only the test's own count).
fn fixture(env: &[(&str, &OsStr)]) -> Command {
    program(Path::new(env!("CARGO_BIN_EXE_settings_fixture")), env)
}

/// [`fixture`] from a copy of it at `path`.
fn program(path: &Path, env: &[(&str, &OsStr)]) -> Command {
    let mut command = Command::new(path);
    for (name, _) in std::env::vars_os() {
        if name.as_bytes().starts_with(b"CLUSTER_") {
            command.env_remove(name);
        }
    }
    command
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs `command` to its exit (bounded); returns its exit code, stdout and stderr.
fn run_to_exit(mut command: Command) -> (Option<i32>, String, String) {
    let mut child = cluster_tests::spawn(&mut command);
    let status = cluster_tests::wait_for_exit(&mut child, WAIT);
    let (stdout, stderr) = outputs(&mut child);
    (status.code(), stdout, stderr)
}

fn outputs(child: &mut Child) -> (String, String) {
    (
        cluster_tests::read_all(child.stdout.take()),
        cluster_tests::read_all(child.stderr.take()),
    )
}

/// The first `count` lines the child prints on stdout, each waited for at most `WAIT`.
fn first_lines(child: &mut Child, count: usize) -> Vec<String> {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.expect("read")).is_err() {
                break;
            }
        }
    });
    (0..count)
        .map(|_| rx.recv_timeout(WAIT).expect("a worker line"))
        .collect()
}

fn pid_of(worker_line: &str) -> u32 {
    // `worker <id> pid <pid> port <port>`
    worker_line
        .split_whitespace()
        .nth(3)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn the_disconnect_timeout_set_in_the_attribute_ends_a_stuck_shutdown() {
    let mut primary = fixture(&[]).spawn().expect("spawn");
    let workers = first_lines(&mut primary, 2);
    let pids: Vec<u32> = workers.iter().map(|line| pid_of(line)).collect();
    // One connection, held by whichever worker got it.
    let port: u16 = workers[0].rsplit(' ').next().unwrap().parse().unwrap();
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    let mut hi = [0; 3];
    std::io::Read::read_exact(&mut client, &mut hi).unwrap();
    let asked = Instant::now();
    cluster_tests::signal(primary.id(), libc::SIGTERM).unwrap();
    let status = cluster_tests::wait_for_exit(&mut primary, WAIT);
    let took = asked.elapsed();
    let stderr = cluster_tests::read_all(primary.stderr.take());
    // Both workers ignore the shutdown: the primary waited the 2 s of its settings (not the
    // default 30 s), then killed them.
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(took >= Duration::from_millis(1900), "{took:?}: {stderr}");
    assert!(took < Duration::from_secs(15), "{took:?}: {stderr}");
    assert_eq!(
        stderr
            .matches("did not exit within the disconnect timeout; killing it")
            .count(),
        2,
        "{stderr}"
    );
    // Each kill says what the worker still held, and the likely cause.
    assert_eq!(
        stderr
            .matches("it still held 1 open TCP connections")
            .count(),
        1,
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("it held no open TCP connection").count(),
        1,
        "{stderr}"
    );
    drop(client);
    for pid in pids {
        cluster_tests::wait_gone(pid, WAIT);
    }
}

#[test]
fn the_environment_overrides_the_settings_of_the_code() {
    let mut primary = fixture(&[
        ("CLUSTER_WORKERS", OsStr::new("1")),
        ("CLUSTER_DISCONNECT_TIMEOUT", OsStr::new("100ms")),
    ])
    .spawn()
    .expect("spawn");
    let worker = first_lines(&mut primary, 1).remove(0);
    cluster_tests::signal(primary.id(), libc::SIGTERM).unwrap();
    let status = cluster_tests::wait_for_exit(&mut primary, WAIT);
    let stderr = cluster_tests::read_all(primary.stderr.take());
    assert!(status.success(), "{stderr}");
    // One worker (not the code's two), killed after the environment's 100 ms.
    assert_eq!(
        stderr
            .matches("did not exit within the disconnect timeout; killing it")
            .count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("deadline=100ms"), "{stderr}");
    cluster_tests::wait_gone(pid_of(&worker), WAIT);
}

#[test]
fn every_bad_environment_value_stops_the_program_with_78_before_any_worker_starts() {
    let numbers = [
        "",
        "abc",
        "-1",
        " 3",
        "3 ",
        "0x10",
        "5s",
        "+2",
        "1e3",
        "1_000",
        "99999999999999999999999",
    ];
    let durations = [
        "",
        "20",
        "abc",
        "-1s",
        " 20s",
        "20s ",
        "20 s",
        "0x10s",
        "1.5s",
        "0s",
        "25h",
        "99999999999999999999999h",
    ];
    let mut cases: Vec<(&str, &str)> = Vec::new();
    cases.extend(numbers.iter().map(|v| ("CLUSTER_WORKERS", *v)));
    cases.push(("CLUSTER_WORKERS", "1025"));
    cases.push(("CLUSTER_WORKERS", "100000"));
    cases.extend(numbers.iter().map(|v| ("CLUSTER_HANDOFF_WINDOW", *v)));
    cases.push(("CLUSTER_HANDOFF_WINDOW", "0"));
    cases.push(("CLUSTER_HANDOFF_WINDOW", "4097"));
    for variable in [
        "CLUSTER_DISCONNECT_TIMEOUT",
        "CLUSTER_BOOT_TIMEOUT",
        "CLUSTER_HANDOFF_TIMEOUT",
        "CLUSTER_HEARTBEAT_TIMEOUT",
    ] {
        cases.extend(durations.iter().map(|v| (variable, *v)));
    }
    cases.push(("CLUSTER_HEARTBEAT_TIMEOUT", "1s"));
    for value in ["", "RR", "round_robin", "reuseport"] {
        cases.push(("CLUSTER_SCHED_POLICY", value));
    }
    for value in ["", "2", "true", "yes"] {
        cases.push(("CLUSTER_BATCH_SCHEDULING", value));
    }
    cases.push(("CLUSTER_HEARTBEAT_TIMEOUT_MS", "3000"));
    for value in ["", "-1", "0", "1000+", "+100", "1000+-1", "1e3", "on"] {
        cases.push(("CLUSTER_MAX_REQUESTS", value));
    }
    for value in [
        "", "12XB", "512", "512M", "512 MiB", "-1MiB", "1.5GiB", "1KiB",
    ] {
        cases.push(("CLUSTER_MAX_MEMORY", value));
    }
    for (variable, value) in cases {
        let (code, stdout, stderr) = run_to_exit(fixture(&[(variable, OsStr::new(value))]));
        let case = format!("{variable}={value:?}");
        assert_eq!(code, Some(78), "{case}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{case}: one line: {stderr}");
        assert!(stderr.contains(&case), "{case}: {stderr}");
        assert!(stdout.is_empty(), "{case}: no worker may start: {stdout}");
    }
    // A value that is not UTF-8.
    let (code, _, stderr) =
        run_to_exit(fixture(&[("CLUSTER_WORKERS", OsStr::from_bytes(b"\xff"))]));
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("CLUSTER_WORKERS="), "{stderr}");
}

#[test]
fn more_workers_than_the_process_limit_allows_start_none() {
    // Root is exempt from RLIMIT_NPROC: as root, the program runs as `nobody`.
    let is_root = cluster_tests::is_root();
    let fixture = Path::new(env!("CARGO_BIN_EXE_settings_fixture"));
    let (scratch, copy) = if is_root {
        let (dir, copy) = cluster_tests::copy_for_nobody(fixture, "nproc");
        (Some(dir), copy)
    } else {
        (None, fixture.to_path_buf())
    };
    let mut command = program(&copy, &[("CLUSTER_WORKERS", OsStr::new("1000"))]);
    command.current_dir(std::env::temp_dir());
    if is_root {
        use std::os::unix::process::CommandExt;
        command.uid(65534).gid(65534);
    }
    cluster_tests::limit_processes(&mut command, 200);
    let (code, stdout, stderr) = run_to_exit(command);
    if let Some(scratch) = scratch {
        let _ = std::fs::remove_dir_all(scratch);
    }
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("RLIMIT_NPROC is 200"), "{stderr}");
    assert!(stdout.is_empty(), "no worker may start: {stdout}");
}

#[test]
fn a_workers_program_that_does_not_exist_is_refused_at_start() {
    let (code, stdout, stderr) = run_to_exit(fixture(&[(
        "FIXTURE_EXEC",
        OsStr::new("/nonexistent/cluster-worker"),
    )]));
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("/nonexistent/cluster-worker") && stderr.contains("No such file"),
        "{stderr}"
    );
}

#[test]
fn workers_that_cannot_be_started_are_logged_once_per_burst() {
    // Every start fails (a script whose interpreter does not exist: exec says ENOENT): each
    // of the 4 slots retries with backoff until its breaker opens, and the log has one line for
    // the whole burst, not one per try.
    let program = std::env::temp_dir().join(format!("cluster-noexec-{}", std::process::id()));
    std::fs::write(&program, b"#!/nonexistent/interpreter\n").unwrap();
    std::fs::set_permissions(
        &program,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (code, stdout, stderr) = run_to_exit(fixture(&[
        ("CLUSTER_WORKERS", OsStr::new("4")),
        ("FIXTURE_EXEC", program.as_os_str()),
    ]));
    std::fs::remove_file(&program).unwrap();
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(
        stderr.matches("could not start a worker").count(),
        1,
        "{stderr}"
    );
    assert!(!stderr.contains("restarting a crashed worker"), "{stderr}");
    // 5 failed starts per slot open its breaker.
    assert!(
        stderr.contains("failed_starts=20") && stderr.contains("no worker is left to start"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("crash loop").count(), 4, "{stderr}");
}

/// The `Role` form's fixture (`cluster::run` without the macro), as [`fixture`].
fn role_fixture(env: &[(&str, &OsStr)]) -> Command {
    program(Path::new(env!("CARGO_BIN_EXE_role_fixture")), env)
}

/// The workers a run of the `Role` fixture started, from its stdout.
fn workers_started(stdout: &str) -> usize {
    stdout.lines().filter(|l| l.starts_with("worker ")).count()
}

#[test]
fn cluster_run_applies_the_environment_as_the_macro_does() {
    let (code, stdout, stderr) = run_to_exit(role_fixture(&[("CLUSTER_WORKERS", OsStr::new("1"))]));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.starts_with("forking 1\n"), "{stdout}");
    assert_eq!(workers_started(&stdout), 1, "{stdout}");
    // A bad value stops it as it stops the macro's forms: 78, one line, nothing started.
    let (code, stdout, stderr) =
        run_to_exit(role_fixture(&[("CLUSTER_WORKERS", OsStr::new("abc"))]));
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("CLUSTER_WORKERS=\"abc\""), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
}

#[test]
fn cluster_run_with_env_overrides_off_ignores_the_environment() {
    for value in ["1", "abc"] {
        let (code, stdout, stderr) = run_to_exit(role_fixture(&[
            ("CLUSTER_WORKERS", OsStr::new(value)),
            ("FIXTURE_NO_ENV", OsStr::new("1")),
        ]));
        assert_eq!(code, Some(0), "{value}: {stderr}");
        assert!(stdout.starts_with("forking 2\n"), "{value}: {stdout}");
        assert_eq!(workers_started(&stdout), 2, "{value}: {stdout}");
    }
}

#[test]
fn the_role_form_refuses_more_workers_than_the_process_limit_allows() {
    // As `more_workers_than_the_process_limit_allows_start_none`, through `cluster::run`.
    let is_root = cluster_tests::is_root();
    let fixture = Path::new(env!("CARGO_BIN_EXE_role_fixture"));
    let (scratch, copy) = if is_root {
        let (dir, copy) = cluster_tests::copy_for_nobody(fixture, "nproc-role");
        (Some(dir), copy)
    } else {
        (None, fixture.to_path_buf())
    };
    let mut command = program(&copy, &[("CLUSTER_WORKERS", OsStr::new("1000"))]);
    command.current_dir(std::env::temp_dir());
    if is_root {
        use std::os::unix::process::CommandExt;
        command.uid(65534).gid(65534);
    }
    cluster_tests::limit_processes(&mut command, 200);
    let (code, stdout, stderr) = run_to_exit(command);
    if let Some(scratch) = scratch {
        let _ = std::fs::remove_dir_all(scratch);
    }
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("RLIMIT_NPROC is 200"), "{stderr}");
    assert!(
        stdout.is_empty(),
        "the primary's code may not run: {stdout}"
    );
}

#[test]
fn a_taken_port_stops_the_start_with_one_readable_line() {
    // Another process holds the port the program serves on.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let (code, stdout, stderr) = run_to_exit(program(
        Path::new(env!("CARGO_BIN_EXE_hello")),
        &[
            ("CLUSTER_WORKERS", OsStr::new("2")),
            ("ADDR", OsStr::new(&address)),
        ],
    ));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains(&address) && errors[0].contains("Address already in use"),
        "{stderr}"
    );
    // No `Error: Os { .. }` dump from `main` (the primary's or a worker's), and no second
    // report of the same failure.
    assert!(!stderr.contains("Error:"), "{stderr}");
    assert!(!stderr.contains("Os {"), "{stderr}");
    assert_eq!(
        stderr.matches("Address already in use").count(),
        1,
        "{stderr}"
    );
}

#[test]
fn an_error_from_main_is_printed_once_as_a_person_reads_it() {
    // Unclustered (`CLUSTER_WORKERS=0`): the body's own error, as `Display`, on one line.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let (code, _, stderr) = run_to_exit(program(
        Path::new(env!("CARGO_BIN_EXE_hello")),
        &[
            ("CLUSTER_WORKERS", OsStr::new("0")),
            ("ADDR", OsStr::new(&address)),
        ],
    ));
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "hello: Address already in use (os error 98)",
        "{stderr}"
    );
}

#[test]
fn the_startup_line_shows_the_settings_in_force_and_where_the_count_came_from() {
    let mut primary = fixture(&[
        ("CLUSTER_WORKERS", OsStr::new("1")),
        ("CLUSTER_HANDOFF_TIMEOUT", OsStr::new("7s")),
    ])
    .spawn()
    .expect("spawn");
    let worker = first_lines(&mut primary, 1).remove(0);
    cluster_tests::signal(primary.id(), libc::SIGTERM).unwrap();
    let status = cluster_tests::wait_for_exit(&mut primary, WAIT);
    let stderr = cluster_tests::read_all(primary.stderr.take());
    assert!(status.success(), "{stderr}");
    cluster_tests::wait_gone(pid_of(&worker), WAIT);
    let banners: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("starting the workers"))
        .collect();
    assert_eq!(banners.len(), 1, "{stderr}");
    let banner = banners[0];
    assert!(banner.contains(" INFO "), "{banner}");
    for field in [
        "program=settings_fixture",
        &format!("protocol={}", cluster::env::PROTOCOL_VERSION),
        "cluster=0.1.0",
        // The environment's count, and the code's disconnect timeout (not the default 30s).
        "workers=1",
        "workers_from=CLUSTER_WORKERS",
        "handoff_timeout=7s",
        "disconnect_timeout=2s",
        "boot_timeout=1m",
        "heartbeat_timeout=30s",
        "shutdown_delay=0",
        "policy=rr",
        "metrics=none",
        "control=none",
    ] {
        assert!(banner.contains(field), "{field}: {banner}");
    }
    assert!(!banner.contains("Some("), "{banner}");
}

#[test]
fn check_config_names_every_bad_variable_and_starts_nothing() {
    let (code, stdout, stderr) = run_to_exit(fixture(&[
        ("CLUSTER_CHECK_CONFIG", OsStr::new("1")),
        ("CLUSTER_WORKERS", OsStr::new("abc")),
        ("CLUSTER_BOOT_TIMEOUT", OsStr::new("5")),
        ("CLUSTER_SCHED_POLICY", OsStr::new("RR")),
    ]));
    assert_eq!(code, Some(78), "{stdout}{stderr}");
    // One line per problem, each naming its variable and value.
    assert_eq!(stderr.lines().count(), 3, "{stderr}");
    for case in [
        "CLUSTER_WORKERS=\"abc\"",
        "CLUSTER_BOOT_TIMEOUT=\"5\"",
        "CLUSTER_SCHED_POLICY=\"RR\"",
    ] {
        assert!(stderr.contains(case), "{case}: {stderr}");
    }
    // The settings it would run with are printed; no worker started (each prints a line).
    assert!(stdout.contains("3 problems"), "{stdout}");
    assert!(
        !stdout.lines().any(|l| l.starts_with("worker ")),
        "{stdout}"
    );

    // A good configuration: 0, and every setting with its source.
    let (code, stdout, stderr) = run_to_exit(fixture(&[
        ("CLUSTER_CHECK_CONFIG", OsStr::new("1")),
        ("CLUSTER_BOOT_TIMEOUT", OsStr::new("5s")),
    ]));
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    let line = |name: &str| -> Vec<String> {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name}: {stdout}"));
        line.split_whitespace().map(str::to_owned).collect()
    };
    assert_eq!(line("workers"), ["workers", "2", "(code)"]);
    assert_eq!(
        line("boot_timeout"),
        ["boot_timeout", "5s", "(CLUSTER_BOOT_TIMEOUT)"]
    );
    assert_eq!(
        line("disconnect_timeout"),
        ["disconnect_timeout", "2s", "(code)"]
    );
    assert_eq!(
        line("handoff_timeout"),
        ["handoff_timeout", "10s", "(default)"]
    );
    assert!(stdout.contains("no problem found"), "{stdout}");
    assert!(
        !stdout.lines().any(|l| l.starts_with("worker ")),
        "{stdout}"
    );
}

#[test]
fn every_bad_variable_is_reported_at_start_not_only_the_first() {
    let (code, stdout, stderr) = run_to_exit(fixture(&[
        ("CLUSTER_WORKERS", OsStr::new("abc")),
        ("CLUSTER_HANDOFF_WINDOW", OsStr::new("0")),
    ]));
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(stderr.lines().count(), 2, "{stderr}");
    assert!(
        stderr.contains("CLUSTER_WORKERS=\"abc\"")
            && stderr.contains("CLUSTER_HANDOFF_WINDOW=\"0\""),
        "{stderr}"
    );
}

#[test]
fn a_misspelt_variable_is_a_warning_naming_the_right_one_and_an_error_under_the_check() {
    let mut primary = fixture(&[("CLUSTER_WORKER", OsStr::new("1"))])
        .spawn()
        .expect("spawn");
    // It starts as configured in code (the misspelt variable changes nothing): two workers.
    let workers = first_lines(&mut primary, 2);
    cluster_tests::signal(primary.id(), libc::SIGTERM).unwrap();
    let status = cluster_tests::wait_for_exit(&mut primary, WAIT);
    let stderr = cluster_tests::read_all(primary.stderr.take());
    assert!(status.success(), "{stderr}");
    for worker in &workers {
        cluster_tests::wait_gone(pid_of(worker), WAIT);
    }
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("CLUSTER_WORKER "))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("warning"), "{stderr}");
    assert!(
        warnings[0].contains("did you mean CLUSTER_WORKERS?"),
        "{stderr}"
    );

    let (code, stdout, stderr) = run_to_exit(fixture(&[
        ("CLUSTER_CHECK_CONFIG", OsStr::new("1")),
        ("CLUSTER_WORKER", OsStr::new("1")),
    ]));
    assert_eq!(code, Some(78), "{stdout}{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("configuration error: CLUSTER_WORKER is not a variable")
            && stderr.contains("CLUSTER_WORKERS"),
        "{stderr}"
    );
}
