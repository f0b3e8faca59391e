//! The primary survives accept errors (reference scenario 13): out of fds, it pauses accepting
//! and carries on once fds free up; no connection is lost (they wait in the kernel's backlog).

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn primary_out_of_fds_pauses_accepting_and_loses_nothing() {
    let socket = std::env::temp_dir().join(format!("cluster-accept-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let mut command = Command::new(env!("CARGO_BIN_EXE_primary_fixture"));
    command
        .env("CLUSTER_WORKERS", "2")
        .env("CLUSTER_CONTROL_SOCKET", &socket)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cluster_tests::limit_open_files(&mut command, 32);
    let mut primary = command.spawn().expect("spawn");
    let mut lines = BufReader::new(primary.stdout.take().unwrap()).lines();
    let mut port = 0;
    let mut workers = Vec::new();
    for _ in 0..2 {
        let line = lines.next().expect("a worker line").expect("read");
        let fields: Vec<&str> = line.split_whitespace().collect();
        workers.push(fields[3].parse::<u32>().unwrap());
        port = fields[5].parse::<u16>().unwrap();
    }
    // Workers stopped: no acks come, so the primary keeps every connection it accepts (8 in
    // flight, the rest queued) and must run out of fds, whatever the timing.
    let stderr = primary.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    for pid in &workers {
        cluster_tests::signal(*pid, libc::SIGSTOP).unwrap();
    }
    // Many more clients at once than the primary has fds for.
    let clients: Vec<_> = (0..100)
        .map(|_| {
            std::thread::spawn(move || {
                let mut stream =
                    std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
                stream
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                let mut answer = String::new();
                stream.read_to_string(&mut answer).expect("an answer");
                answer
            })
        })
        .collect();
    // Out of fds: every one of its 32 is open.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let ran_out = loop {
        let open =
            std::fs::read_dir(format!("/proc/{}/fd", primary.id())).map_or(0, Iterator::count);
        if open >= 32 {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::yield_now();
    };
    for pid in &workers {
        cluster_tests::signal(*pid, libc::SIGCONT).unwrap();
    }
    assert!(ran_out, "the primary never ran out of fds");
    for client in clients {
        let answer = client.join().unwrap();
        assert!(matches!(answer.trim(), "1" | "2"), "answer {answer:?}");
    }
    // It counted the accepts that failed, and handed every connection over.
    let status = control_status(&socket);
    assert!(
        status["accept_errors"].as_u64().is_some_and(|n| n >= 1),
        "{status}"
    );
    assert_eq!(status["handoffs"].as_u64(), Some(100), "{status}");
    cluster_tests::signal(primary.id(), libc::SIGTERM).unwrap();
    let status = primary.wait().unwrap();
    let stderr = reader.join().unwrap();
    std::io::stderr().write_all(stderr.as_bytes()).unwrap();
    assert!(status.success(), "{status:?}");
    for pid in workers {
        let _ = cluster_tests::signal(pid, libc::SIGKILL);
    }
}

/// The primary's status, as its control socket answers `status`.
fn control_status(socket: &std::path::Path) -> serde_json::Value {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("the control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(b"status\n").unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    let answer: serde_json::Value = serde_json::from_str(&line).expect("a JSON answer");
    answer["status"].clone()
}
