#!/usr/bin/env python3
"""What handing idle keep-alive connections back costs, and what it saves: `hello` (release, 2
workers) with N idle keep-alive connections, each served once, through R rolling reloads, side
by side in one run:

    hand-back N   the connections are handed back at every reload (the default)
    hand-back 0   the same reloads with no connection: what a reload costs by itself
    closing N     CLUSTER_HAND_BACK=0: the old drain, which closes idle connections

    python3 benches/load/hand_back.py                  # N = 2000, R = 10, 3 repetitions
    python3 benches/load/hand_back.py --connections 500 --reloads 5 --reps 1
    python3 benches/load/hand_back.py --write          # and put the section in docs/benchmarks.md

CPU is every process of the server: the primary and its live workers from /proc/<pid>/schedstat
(nanoseconds), and the workers that exited from the primary's cutime/cstime (clock ticks). The
CPU per handed-back connection is (hand-back N - hand-back 0) / connections handed back, per
repetition. After every reload each connection sends one request: one that finds its connection
closed reconnects (counted) and sends it again; one that fails otherwise is counted as failed.
Load goes to 127.0.0.1 only.
"""
import argparse, os, resource, signal, socket, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import replace_section  # noqa: E402

HEADING = "## Idle keep-alive connections handed back on reload"

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
HELLO = os.path.join(TARGET, "release/examples/hello")
HZ = os.sysconf("SC_CLK_TCK")
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def schedstat_ns(pid):
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except OSError:
        return 0


def reaped_children_ns(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) * 1_000_000_000 // HZ


def cpu_ns(primary, seen):
    """The server's CPU so far: the primary, the workers alive (remembered in `seen`, so that
    one that exits between two readings is counted from the primary's cutime), and the reaped."""
    live = {pid: schedstat_ns(pid) for pid in children(primary)}
    seen.update(live)
    return schedstat_ns(primary) + sum(live.values()) + reaped_children_ns(primary)


def metric(port, name):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(b"GET /metrics HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    for line in data.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def read_response(sock):
    """One response; None if the connection was closed before it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")))
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        body += chunk
    return head


def connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def use_all(conns, port, counts):
    """One request on each connection; reconnect those that were closed."""
    for i, s in enumerate(conns):
        try:
            s.sendall(REQUEST)
            head = read_response(s)
        except OSError:
            head = None
        if head is None:
            counts["reconnects"] += 1
            s.close()
            conns[i] = s = connect(port)
            s.sendall(REQUEST)
            head = read_response(s)
            if head is None:
                counts["failed"] += 1
                continue
        if not head.startswith(b"HTTP/1.1 200"):
            counts["failed"] += 1
        if b"connection: close" in head.lower():
            counts["reconnects"] += 1
            s.close()
            conns[i] = connect(port)


def run(connections, reloads, hand_back):
    port, metrics = free_port(), free_port()
    env = dict(os.environ, ADDR=f"127.0.0.1:{port}", CLUSTER_WORKERS="2", RUST_LOG="warn",
               CLUSTER_METRICS_ADDR=f"127.0.0.1:{metrics}", CLUSTER_HAND_BACK="1" if hand_back else "0")
    proc = subprocess.Popen([HELLO], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if metric(metrics, "cluster_workers") >= 0 and len(children(proc.pid)) == 2:
                    s = connect(port)
                    s.sendall(REQUEST)
                    if read_response(s):
                        s.close()
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit("hello never served")
            time.sleep(0.05)
        conns = [connect(port) for _ in range(connections)]
        counts = {"reconnects": 0, "failed": 0}
        use_all(conns, port, counts)
        seen, spent = {}, 0
        for done in range(1, reloads + 1):
            before = cpu_ns(proc.pid, seen)
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            # Complete, and the old workers gone: only the two new ones left.
            while metric(metrics, 'cluster_reloads_total{result="complete"}') < done or len(children(proc.pid)) != 2:
                if time.monotonic() > deadline:
                    sys.exit("the reload never completed")
                time.sleep(0.01)
            spent += cpu_ns(proc.pid, seen) - before
            use_all(conns, port, counts)
        handed_back = metric(metrics, "cluster_connections_handed_back_total")
        for s in conns:
            s.close()
        return {"cpu_ns": spent, "handed_back": handed_back, **counts}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.connections * 2 + 256)), hard))
    subprocess.run(["cargo", "build", "--release", "--example", "hello"], cwd=ROOT, check=True)
    per_conn, rows = [], []
    for rep in range(args.reps):
        with_conns = run(args.connections, args.reloads, True)
        alone = run(0, args.reloads, True)
        closing = run(args.connections, args.reloads, False)
        cost = (with_conns["cpu_ns"] - alone["cpu_ns"]) / max(with_conns["handed_back"], 1) / 1000
        per_conn.append(cost)
        rows.append((rep + 1, with_conns, alone, closing, cost))
    n, r = args.connections, args.reloads
    lines = [
        f"| repetition | hand-back {n}: CPU, handed back, reconnects, failed | hand-back 0: CPU | "
        f"closing {n}: CPU, reconnects, failed | CPU per handed-back connection |",
        "|---|---|---|---|---|",
    ]
    for rep, w, a, c, cost in rows:
        lines.append(
            f"| {rep} | {w['cpu_ns'] / 1e6:.0f} ms, {w['handed_back']:.0f}, {w['reconnects']}, {w['failed']} | "
            f"{a['cpu_ns'] / 1e6:.0f} ms | {c['cpu_ns'] / 1e6:.0f} ms, {c['reconnects']}, {c['failed']} | "
            f"{cost:.1f} µs |")
    summary = (f"Primary and worker CPU per handed-back connection: median {statistics.median(per_conn):.1f} µs, "
               f"worst repetition {max(per_conn):.1f} µs.")
    table = "\n".join(lines)
    print(table + "\n\n" + summary)
    if args.write:
        section = f"""{HEADING}

Generated by `python3 benches/load/hand_back.py --write`: `hello` (release, 2 workers) with {n} idle
keep-alive connections, each served once, through {r} rolling reloads per run, {args.reps} repetition(s)
({os.cpu_count()} CPUs, shared with whatever else ran). CPU is every server process over the reloads
(primary, workers alive and exited); after each reload every connection sends one request, and one
that finds its connection closed reconnects. `hand-back 0` is the same reloads with no connection
(what spawning and retiring workers costs by itself); `closing` is the old drain
(`CLUSTER_HAND_BACK=0`), which closes idle connections. A connection can move more than once per
reload (to an old worker first when its replacement's window is full).

{table}

{summary}
"""
        replace_section(os.path.join(ROOT, "docs/benchmarks.md"), HEADING, section)
        print("wrote docs/benchmarks.md")


if __name__ == "__main__":
    main()
