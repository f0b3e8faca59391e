//! A worker that breaks the protocol on purpose, to show the primary survives it. It does not use
//! the runtime: it writes raw datagrams on fd 3. `ROGUE` picks the offence.

use std::os::fd::AsFd;

use cluster_core::wire::{
    self, Envelope, HandleId, ListenFlags, ListenRequest, ListenTarget, PrimaryMessage, Seq,
    SocketKind, UserKind, WorkerMessage,
};

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
        // Reports connections ended that it was never given.
        "ended" => cluster_tests::send_raw_on_link(&online, None).and_then(|()| {
            cluster_tests::send_raw_on_link(&encoded(&WorkerMessage::Heartbeat { ended: 3 }), None)
        }),
        "notconn" => {
            // Gives back, as a connection, its stdin (/dev/null).
            let stdin = std::io::stdin();
            let give_back = encoded(&WorkerMessage::Return {
                handle: HandleId::new(0),
            });
            cluster_tests::send_raw_on_link(&online, None)
                .and_then(|()| cluster_tests::send_raw_on_link(&give_back, Some(stdin.as_fd())))
        }
        "handback-long" | "handback-ungiven" | "handback-listener" => {
            // Hands back what is not a served connection, or with too many bytes: a listening
            // socket of its own, or its stdin... the primary must refuse each.
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let peer =
                std::net::TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
            let prefix = if offence == "handback-long" {
                vec![b'x'; wire::MAX_PREFIX + 1]
            } else {
                b"GE".to_vec()
            };
            let hand_back = encoded(&WorkerMessage::HandBack {
                handle: HandleId::new(0),
                prefix,
            });
            let fd = if offence == "handback-listener" {
                listener.as_fd()
            } else {
                peer.as_fd()
            };
            cluster_tests::send_raw_on_link(&online, None)
                .and_then(|()| cluster_tests::send_raw_on_link(&hand_back, Some(fd)))
        }
        "fd" => {
            let stdin = std::io::stdin();
            cluster_tests::send_raw_on_link(&online, None)
                .and_then(|()| cluster_tests::send_raw_on_link(&[9, 0], Some(stdin.as_fd())))
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
        "exec" => {
            // Not a rogue at all: becomes the program `ROGUE_EXEC` names, link and all.
            use std::os::unix::process::CommandExt;
            let program = std::env::var("ROGUE_EXEC").expect("ROGUE_EXEC");
            let error = std::process::Command::new(program).exec();
            panic!("exec: {error}");
        }
        "listen-then-hangup" => {
            // Joins the round robin of the cluster's first `127.0.0.1:0` listener (shared by
            // every worker's first bind of port 0), then stops reading its link and sends nothing
            // more: what is handed to it never reaches it.
            cluster_tests::send_raw_on_link(&online, None).expect("send");
            let query = encoded(&WorkerMessage::QueryServer {
                seq: Seq::new(1),
                request: ListenRequest {
                    target: ListenTarget::Ip(([127, 0, 0, 1], 0).into()),
                    kind: SocketKind::Stream,
                    backlog: 0,
                    flags: ListenFlags::default(),
                },
            });
            cluster_tests::send_raw_on_link(&query, None).expect("send");
            let handle = loop {
                let frame = cluster_tests::recv_raw_on_link().expect("a reply");
                if let Ok(PrimaryMessage::ListenReply { result, .. }) = wire::decode(&frame) {
                    break result.expect("listening").handle;
                }
            };
            cluster_tests::send_raw_on_link(&encoded(&WorkerMessage::Listening { handle }), None)
                .expect("send");
            cluster_tests::stop_reading_link();
            loop {
                std::thread::park();
            }
        }
        other => panic!("unknown offence {other}"),
    };
    sent.expect("send");
    cluster_tests::wait_for_link_eof();
}
