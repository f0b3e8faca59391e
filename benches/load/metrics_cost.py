"""What the metrics endpoint costs the primary, measured so that the answer is not lost in noise.

    python3 benches/load/metrics_cost.py                 # both measurements, with examples/hello
    python3 benches/load/metrics_cost.py --windows 12 --window 8

1. Per scrape, on an idle cluster: the primary's CPU time (user + system, from /proc) for
   scrapes in a row (the connections each worker serves are read at most every 5 s, so most of
   them reuse a reading), and for scrapes 5.2 s apart (each takes a new reading: the kernel's
   walk of its whole TCP table).
2. Under connection churn, in one process: windows of wrk (pinned to CPU 1, `Connection:
   close`, so each request is a handoff) alternate between no scraping at all and one scrape a
   second (15 times as often as Prometheus's default); each window reads the primary's CPU.
   Comparing windows of one process removes the restart-to-restart spread of separate runs.

`run.py` calls `measure` for docs/benchmarks.md. Load goes to 127.0.0.1 only, for a bounded
duration.
"""

import argparse, os, re, shutil, signal, socket, statistics, subprocess, sys, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
HELLO = os.path.join(TARGET, "release/examples/hello")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := c.recv(65536):
            data += chunk
        return data.decode(errors="replace")


def cpu_seconds(pid):
    """User + system time of every thread of `pid` that ever ran (/proc/<pid>/stat: clock ticks)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_seconds(pid):
    """Time on a CPU of `pid`'s live threads, in nanoseconds' resolution (schedstat), for spans
    shorter than a thread's life: the primary's threads, blocking ones included (Tokio keeps an
    idle one 10 s), outlive the gaps here."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(open(f"/proc/{pid}/task/{task}/schedstat").read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


class Cluster:
    """`hello` with 2 workers and the metrics endpoint, pinned to CPU 0; stopped by pid."""

    def __init__(self, binary):
        self.app, self.metrics = free_port(), free_port()
        env = dict(os.environ, ADDR=f"127.0.0.1:{self.app}", CLUSTER_WORKERS="2", RUST_LOG="warn",
                   CLUSTER_METRICS_ADDR=f"127.0.0.1:{self.metrics}")
        self.proc = subprocess.Popen(["taskset", "-c", "0", binary], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                if " 200 " in get(self.metrics, "/readyz").split("\r\n", 1)[0]:
                    return
            except OSError:
                pass
            if time.time() > deadline or self.proc.poll() is not None:
                self.stop()
                sys.exit("the cluster did not become ready")
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def per_scrape(binary, count, gap):
    """The primary's CPU per scrape, in µs, for `count` scrapes `gap` seconds apart, less what
    it spends idle over as long (heartbeats, timers)."""
    cluster = Cluster(binary)
    pid = cluster.proc.pid
    try:
        get(cluster.metrics, "/metrics")
        time.sleep(gap)
        before, start = run_seconds(pid), time.time()
        for _ in range(count):
            get(cluster.metrics, "/metrics")
            time.sleep(gap)
        busy, took = run_seconds(pid) - before, time.time() - start
        # Idle over 4 s, scaled: Tokio lets an idle blocking thread (the one that read /proc)
        # exit after 10 s, and the time of an exited thread drops out of `run_seconds`.
        before = run_seconds(pid)
        time.sleep(4)
        idle = (run_seconds(pid) - before) * took / 4
        return 1e6 * (busy - idle) / count
    finally:
        cluster.stop()


def wrk(port, seconds):
    """`wrk` pinned to CPU 1 with `Connection: close` for `seconds`; returns its request count."""
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{seconds}s", "-H", "Connection: close",
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"(\d+) requests in", out).group(1))


def under_churn(binary, windows, window):
    """Per mode (`off`, `on`): the primary's µs of CPU per request (each a handoff) and
    requests/s, window by window. Nothing but the scraper in `on` windows touches the endpoint."""
    if not shutil.which("wrk"):
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
    cluster = Cluster(binary)
    results = {"off": [], "on": []}
    try:
        wrk(cluster.app, 3)  # warm-up
        for w in range(windows):
            mode = "on" if w % 2 else "off"
            stop = threading.Event()

            def scrape():
                while not stop.wait(1.0):
                    get(cluster.metrics, "/metrics")

            scraper = threading.Thread(target=scrape) if mode == "on" else None
            cpu, start = cpu_seconds(cluster.proc.pid), time.time()
            if scraper:
                scraper.start()
            requests = wrk(cluster.app, window)
            stop.set()
            if scraper:
                scraper.join()
            spent, took = cpu_seconds(cluster.proc.pid) - cpu, time.time() - start
            results[mode].append((1e6 * spent / requests, requests / took))
            print(f"window {w:2} scraping {mode:3}: {requests / took:8.0f} req/s  "
                  f"primary {1e6 * spent / requests:5.2f} µs/request", flush=True)
    finally:
        cluster.stop()
    return results


def measure(binary=HELLO, windows=12, window=8):
    """(name, figure) rows for docs/benchmarks.md."""
    burst = per_scrape(binary, 500, 0)
    walking = per_scrape(binary, 6, 5.2)
    churn = under_churn(binary, windows, window)
    med = statistics.median
    off_us, on_us = med(r[0] for r in churn["off"]), med(r[0] for r in churn["on"])
    off_rate, on_rate = med(r[1] for r in churn["off"]), med(r[1] for r in churn["on"])
    return [
        ("metrics: primary CPU per scrape, 500 in a row (reading reused)", f"{burst:.0f} µs"),
        ("metrics: primary CPU per scrape, 5.2 s apart (each a new reading)", f"{walking:.0f} µs"),
        (f"metrics: churn, primary CPU per request, scraped 1/s vs not ({len(churn['on'])} + {len(churn['off'])} windows of {window:g} s, medians)",
         f"{on_us:.2f} vs {off_us:.2f} µs ({on_us - off_us:+.2f} µs)"),
        ("metrics: churn, requests/s, scraped 1/s vs not", f"{on_rate:,.0f} vs {off_rate:,.0f} ({100 * (on_rate / off_rate - 1):+.1f} %)"),
        ("metrics: a scrape a second's share of a handoff at that rate (a reading per 5 s, the other scrapes reuse it)",
         f"{(walking + 4 * burst) / 5 / off_rate:.3f} µs"),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=HELLO, help="a build of examples/hello (default: this tree's, built)")
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--window", type=float, default=8)
    args = ap.parse_args()
    if args.binary == HELLO:
        subprocess.run(["cargo", "build", "--release", "-q", "--example", "hello", "-p", "examples"],
                       cwd=ROOT, check=True)
    for name, figure in measure(args.binary, args.windows, args.window):
        print(f"| {name} | {figure} |")


if __name__ == "__main__":
    main()
