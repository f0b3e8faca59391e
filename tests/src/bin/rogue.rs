//! A worker that breaks the protocol on purpose, to show the primary survives it. It does not use
//! the runtime: it writes raw datagrams on fd 3. `ROGUE` picks the offence.

use std::os::fd::AsFd;

use cluster::proto::wire::{Envelope, UserKind, WorkerMessage};

fn main() {
    // A valid handshake first (`Online { version: 1, pid: 1 }`), so the offence is what follows.
    let online = [0, 1, 1];
    let offence = std::env::var("ROGUE").expect("ROGUE");
    let sent = match offence.as_str() {
        "garbage" => cluster_tests::send_raw_on_link(&online, None)
            .and_then(|()| cluster_tests::send_raw_on_link(&[0xff, 0x00, 0x13], None)),
        "oversized" => cluster_tests::send_raw_on_link(&online, None)
            .and_then(|()| cluster_tests::send_raw_on_link(&[7; 70_000], None)),
        "version" => cluster_tests::send_raw_on_link(&[0, 99, 1], None),
        "fd" => {
            let stdin = std::io::stdin();
            cluster_tests::send_raw_on_link(&online, None)
                .and_then(|()| cluster_tests::send_raw_on_link(&[9], Some(stdin.as_fd())))
        }
        "hangup" => {
            // Stops reading: every send of the primary now fails with EPIPE. Then it keeps
            // talking, a numbered message every 20 ms, until its own send fails.
            cluster_tests::send_raw_on_link(&online, None).expect("send");
            cluster_tests::stop_reading_link();
            for tick in 0u8.. {
                let message = WorkerMessage::User(Envelope {
                    kind: UserKind::Message,
                    fd: false,
                    // A postcard `u8` is the byte itself.
                    payload: vec![tick],
                });
                let mut frame = Vec::new();
                cluster::proto::wire::encode(&message, &mut frame).expect("encode");
                if cluster_tests::send_raw_on_link(&frame, None).is_err() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            return;
        }
        other => panic!("unknown offence {other}"),
    };
    sent.expect("send");
    cluster_tests::wait_for_link_eof();
}
