//! The core's hot path: one handoff (accept → `NewConn` frame → a cumulative `Accepted` frame
//! when the `NewConn` asks for one, as a worker answers → delivered) and the codec under it. Run
//! with `cargo bench -p benches`.

use std::hint::black_box;
use std::time::Instant;

use cluster_core::wire::{
    self, BoundAddr, ListenFlags, ListenRequest, ListenTarget, PROTOCOL_VERSION, PrimaryMessage,
    Seq, SocketKind, WorkerMessage,
};
use cluster_core::{Config, HandleId, Output, Primary, WorkerId};
use criterion::{Criterion, criterion_group, criterion_main};

fn encoded(message: &WorkerMessage) -> Vec<u8> {
    let mut buf = Vec::new();
    wire::encode(message, &mut buf).unwrap();
    buf
}

/// A primary with one online worker listening on one round-robin handle.
fn primary_with_a_listener() -> (Primary<usize>, WorkerId, HandleId) {
    let now = Instant::now();
    let mut primary = Primary::new(Config::default());
    let worker = primary.add_worker();
    primary.handle_frame(
        now,
        worker,
        &encoded(&WorkerMessage::Online {
            version: PROTOCOL_VERSION,
            pid: 1,
        }),
        &[],
    );
    let request = ListenRequest {
        target: ListenTarget::Ip("127.0.0.1:0".parse().unwrap()),
        kind: SocketKind::Stream,
        backlog: 0,
        flags: ListenFlags::default(),
    };
    primary.handle_frame(
        now,
        worker,
        &encoded(&WorkerMessage::QueryServer {
            seq: Seq::new(1),
            request,
        }),
        &[],
    );
    let mut buf = Vec::new();
    let mut handle = None;
    while let Some(output) = primary.poll_output(&mut buf) {
        if let Output::Bind { handle: h, .. } = output {
            handle = Some(h);
        }
    }
    let handle = handle.unwrap();
    primary.handle_bound(
        now,
        handle,
        Ok(BoundAddr::Ip("127.0.0.1:3000".parse().unwrap())),
    );
    while primary.poll_output(&mut buf).is_some() {}
    (primary, worker, handle)
}

fn handoff(c: &mut Criterion) {
    let (mut primary, worker, handle) = primary_with_a_listener();
    let now = Instant::now();
    let mut buf = Vec::new();
    let mut ack = Vec::new();
    let mut conn = 0usize;
    c.bench_function(
        "core: handoff round trip (accept, NewConn, Accepted when asked, delivered)",
        |b| {
            b.iter(|| {
                conn += 1;
                primary.handle_connection(now, handle, conn).unwrap();
                let mut asked = None;
                while let Some(output) = primary.poll_output(&mut buf) {
                    if let Output::Transmit(_) = output
                        && let Ok(PrimaryMessage::NewConn {
                            seq, reply: true, ..
                        }) = wire::decode(&buf)
                    {
                        asked = Some(seq);
                    }
                }
                if let Some(through) = asked {
                    ack.clear();
                    // No connection reported ended: the count only moves the scheduler's books.
                    let ended = 0;
                    wire::encode(&WorkerMessage::Accepted { through, ended }, &mut ack).unwrap();
                    primary.handle_frame(now, worker, &ack, &[]);
                    while let Some(output) = primary.poll_output(&mut buf) {
                        black_box(output);
                    }
                }
            });
        },
    );
}

fn codec(c: &mut Criterion) {
    let mut buf = Vec::with_capacity(64);
    let message = PrimaryMessage::NewConn {
        seq: Seq::new(123_456),
        handle: HandleId::new(3),
        reply: false,
        prefix: Vec::new(),
    };
    c.bench_function("codec: encode NewConn", |b| {
        b.iter(|| {
            buf.clear();
            wire::encode(black_box(&message), &mut buf).unwrap();
        });
    });
    let frame = encoded(&WorkerMessage::Accepted {
        through: Seq::new(123_456),
        ended: 123_000,
    });
    c.bench_function("codec: decode Accepted", |b| {
        b.iter(|| wire::decode::<WorkerMessage>(black_box(&frame)).unwrap());
    });
}

criterion_group!(benches, handoff, codec);
criterion_main!(benches);
