//! A worker that breaks the protocol on purpose, to show the primary survives it. It does not use
//! the runtime: it writes raw datagrams on fd 3. `ROGUE` picks the offence.

use std::os::fd::AsFd;

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
        other => panic!("unknown offence {other}"),
    };
    sent.expect("send");
    cluster_tests::wait_for_link_eof();
}
