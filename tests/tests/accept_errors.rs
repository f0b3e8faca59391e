//! The primary survives accept errors (reference scenario 13): out of fds, it pauses accepting
//! and carries on once fds free up; no connection is lost (they wait in the kernel's backlog).

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn primary_out_of_fds_pauses_accepting_and_loses_nothing() {
    let mut command = Command::new(env!("CARGO_BIN_EXE_primary_fixture"));
    command
        .env("CLUSTER_WORKERS", "2")
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
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line.clone());
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
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let ran_out = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines_rx.recv_timeout(left) {
            Ok(line) if line.contains("accept failed; pausing accepts") => break true,
            Ok(_) => {}
            Err(_) => break false,
        }
    };
    for pid in &workers {
        cluster_tests::signal(*pid, libc::SIGCONT).unwrap();
    }
    assert!(ran_out, "the primary never ran out of fds");
    for client in clients {
        let answer = client.join().unwrap();
        assert!(matches!(answer.trim(), "1" | "2"), "answer {answer:?}");
    }
    cluster_tests::signal(primary.id(), libc::SIGTERM).unwrap();
    let status = primary.wait().unwrap();
    let stderr = reader.join().unwrap();
    std::io::stderr().write_all(stderr.as_bytes()).unwrap();
    assert!(status.success(), "{status:?}");
    for pid in workers {
        let _ = cluster_tests::signal(pid, libc::SIGKILL);
    }
}
