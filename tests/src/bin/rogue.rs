//! A worker that breaks the protocol on purpose, to show the primary survives it. It does not use
//! the runtime: it writes raw datagrams on fd 3. `ROGUE` picks the offence.

use std::os::fd::AsFd;

use cluster_core::wire::{self, Envelope, HandleId, UserKind, WorkerMessage};

fn encoded(message: &WorkerMessage) -> Vec<u8> {
    let mut frame = Vec::new();
    wire::encode(message, &mut frame).expect("encodes");
    frame
}

fn main() {
    // A valid handshake first, so the offence is what follows.
    let online = encoded(&WorkerMessage::Online {
        version: cluster_core::PROTOCOL_VERSION,
        pid: 1,
    });
    let offence = std::env::var("ROGUE").expect("ROGUE");
    let sent = match offence.as_str() {
        "garbage" => cluster_tests::send_raw_on_link(&online, None)
            .and_then(|()| cluster_tests::send_raw_on_link(&[0xff, 0x00, 0x13], None)),
        "garbage-and-stay" => {
            // Breaks the protocol, then ignores the end of its link: only a kill ends it.
            cluster_tests::send_raw_on_link(&online, None).expect("send");
            cluster_tests::send_raw_on_link(&[0xff, 0x00, 0x13], None).expect("send");
            loop {
                std::thread::park();
            }
        }
        "oversized" => cluster_tests::send_raw_on_link(&online, None)
            .and_then(|()| cluster_tests::send_raw_on_link(&[7; 70_000], None)),
        "version" => cluster_tests::send_raw_on_link(&[0, 99, 1], None),
        "notconn" => {
            // Gives back, as a connection, its stdin (/dev/null).
            let stdin = std::io::stdin();
            let give_back = encoded(&WorkerMessage::Return {
                handle: HandleId::new(0),
            });
            cluster_tests::send_raw_on_link(&online, None)
                .and_then(|()| cluster_tests::send_raw_on_link(&give_back, Some(stdin.as_fd())))
        }
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
                if cluster_tests::send_raw_on_link(&encoded(&message), None).is_err() {
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
