#!/usr/bin/env python3
"""The side-by-side load benchmark: `cluster` (round robin, shared, unclustered) against a plain
2-process SO_REUSEPORT hyper server and Node's own cluster (rr, none), in one interleaved run.

    python3 benches/load/run.py                 # all cells, both layouts, 3 repetitions, 10 s each
    python3 benches/load/run.py --duration 5 --reps 1 --no-write
    python3 benches/load/run.py --only cluster-rr-2,reuseport-2 --layouts pinned --workloads close
    python3 benches/load/run.py --baseline /path/to/older/hello --only cluster-rr-2,baseline-rr-2 ...
    python3 benches/load/run.py --baseline old=/path/a --baseline older=/path/b --only cluster-rr-2,old-rr-2,older-rr-2 ...

It builds what it needs (release), installs wrk if missing (apt-get), pins wrk to CPU 1, restarts
every server for every repetition and warms it up (2 s of the same load, untimed), reads server CPU
time from /proc/<pid>/stat and wrk's CPU from /proc/stat, and writes
docs/benchmarks.md. Load goes to 127.0.0.1 only, for a bounded duration.
"""
import argparse, os, re, shutil, signal, socket, statistics, subprocess, sys, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HZ = os.sysconf("SC_CLK_TCK")
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
HELLO = os.path.join(TARGET, "release/examples/hello")
REUSEPORT = os.path.join(TARGET, "release/reuseport")
NODE_CLUSTER = os.path.join(ROOT, "benches/node/cluster.js")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Where the servers run. wrk always runs on CPU 1; servers and their children inherit the affinity.
LAYOUTS = {
    "spread": ("servers unpinned (they share both CPUs with wrk)", None),
    "pinned": ("every server process on CPU 0, wrk alone on CPU 1 (the steadiest layout: "
               "it compares CPU efficiency, the only thing this machine can show)", {0}),
}


def launch(cmd, env, cpus):
    preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=preexec)


def configs(baselines=()):
    def hello(workers, policy=None, binary=HELLO, **extra):
        def start(port, cpus, **more):
            env = dict(os.environ, ADDR=f"127.0.0.1:{port}", CLUSTER_WORKERS=str(workers), RUST_LOG="warn",
                       **extra, **more)
            if policy:
                env["CLUSTER_SCHED_POLICY"] = policy
            return launch([binary], env, cpus)
        return start

    def scraped(start):
        """`start` with the primary's metrics endpoint on, scraped once a second (15 times as often
        as Prometheus's default) for as long as the server runs."""
        def start_scraped(port, cpus):
            metrics = free_port()
            proc = start(port, cpus, CLUSTER_METRICS_ADDR=f"127.0.0.1:{metrics}")
            def scrape():
                while proc.poll() is None:
                    try:
                        with socket.create_connection(("127.0.0.1", metrics), timeout=1) as c:
                            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: b\r\n\r\n")
                            while c.recv(65536):
                                pass
                    except OSError:
                        pass
                    time.sleep(1)
            threading.Thread(target=scrape, daemon=True).start()
            return proc
        return start_scraped

    def reuseport(port, cpus):
        env = dict(os.environ, ADDR=f"127.0.0.1:{port}", WORKERS="2")
        return launch([REUSEPORT], env, cpus)

    def node(policy):
        def start(port, cpus):
            env = dict(os.environ, PORT=str(port), WORKERS="2", NODE_CLUSTER_SCHED_POLICY=policy)
            return launch(["node", NODE_CLUSTER], env, cpus)
        return start

    found = [
        ("cluster-rr-2", hello(2, "rr"), True),
        ("cluster-rr-2-nobatch", hello(2, "rr", CLUSTER_BATCH_SCHEDULING="0"), True),
        ("cluster-rr-2-metrics", scraped(hello(2, "rr")), True),
        ("cluster-shared-2", hello(2, "none"), False),
        ("unclustered-1", hello(0), False),
        ("reuseport-2", reuseport, False),
    ]
    if shutil.which("node"):
        found += [("node-rr-2", node("rr"), True), ("node-none-2", node("none"), False)]
    for baseline in baselines:
        # Another build of `hello` (an older commit), side by side in the same run.
        label, _, binary = baseline.partition("=")
        if not binary or "/" in label:  # no label: all of it is the path
            label, binary = "", baseline
        found += [(f"{label or 'baseline'}-rr-2", hello(2, "rr", binary=binary), True)]
    return found


def tree(pid):
    """pid and all its descendants."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return pids


def cpu_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except OSError:
        return 0


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
    except (OSError, AttributeError):
        return 0


def cpu_times(cpu):
    """(busy, total) jiffies of one CPU, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = next(line for line in f if line.startswith(f"cpu{cpu} ")).split()[1:]
    ticks = [int(x) for x in fields[:8]]
    idle = ticks[3] + ticks[4]
    return sum(ticks) - idle, sum(ticks)


def wait_ready(port, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                c.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
                if c.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            time.sleep(0.05)
    sys.exit("server never answered")


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        for p in tree(proc.pid):
            os.kill(p, signal.SIGKILL)
        proc.wait()


def wrk(port, workload, duration):
    cmd = ["taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{duration}s", "--latency"]
    if workload == "close":
        cmd += ["-H", "Connection: close"]
    return subprocess.run(cmd + [f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                          timeout=duration + 60).stdout


def run_cell(start, cpus, workload, duration, warmup):
    port = free_port()
    proc = start(port, cpus)
    try:
        wait_ready(port, proc)
        if warmup:
            # Untimed: Node's JIT (and any lazily grown buffer) settles before the measured run.
            wrk(port, workload, warmup)
        time.sleep(0.3)
        pids = tree(proc.pid)
        before = {p: cpu_ticks(p) for p in pids}
        load_before = cpu_times(1)
        out = wrk(port, workload, duration)
        load_after = cpu_times(1)
        after = {p: cpu_ticks(p) for p in pids}
        rss = {p: rss_kib(p) for p in pids}
    finally:
        stop(proc)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    errors += int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0

    def ms(label):
        m = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out)
        return float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)] if m else float("nan")

    total_us = sum(after[p] - before[p] for p in pids) / HZ * 1e6
    primary_us = (after[proc.pid] - before[proc.pid]) / HZ * 1e6
    return {
        "rps": rps, "errors": errors, "p50": ms("50"), "p99": ms("99"),
        "cpu_us": total_us / max(requests, 1), "primary_us": primary_us / max(requests, 1),
        "cpu1_busy": 100 * (load_after[0] - load_before[0]) / max(load_after[1] - load_before[1], 1),
        "primary_rss": rss[proc.pid], "worker_rss": max([rss[p] for p in pids if p != proc.pid] or [0]),
    }


def startup(workers, reps=3):
    times = []
    for _ in range(reps):
        port = free_port()
        env = dict(os.environ, ADDR=f"127.0.0.1:{port}", CLUSTER_WORKERS=str(workers), RUST_LOG="info")
        t0 = time.monotonic()
        proc = subprocess.Popen([HELLO], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seen = 0
        for line in proc.stderr:
            if "listening" in line:
                seen += 1
                if seen == workers:
                    break
        times.append((time.monotonic() - t0) * 1000)
        stop(proc)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="seconds of untimed load before each measured run")
    ap.add_argument("--layouts", default="pinned,spread", help=f"comma-separated, of: {', '.join(LAYOUTS)}")
    ap.add_argument("--only", help="comma-separated config names (implies --no-write)")
    ap.add_argument("--workloads", default="keepalive,close")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write docs/benchmarks.md")
    ap.add_argument("--baseline", action="append", default=[],
                    help="[LABEL=]PATH: another build of examples/hello, run as `LABEL-rr-2` "
                         "(default label `baseline`); may be given more than once")
    args = ap.parse_args()
    layouts = args.layouts.split(",")
    workloads = args.workloads.split(",")
    if unknown := [l for l in layouts if l not in LAYOUTS]:
        sys.exit(f"unknown layouts: {unknown}")
    if not shutil.which("wrk"):
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
    subprocess.run(["cargo", "build", "--release", "-q", "--example", "hello", "-p", "examples",
                    "--bin", "reuseport", "-p", "benches"], cwd=ROOT, check=True)
    cells = configs(args.baseline)
    if args.only:
        cells = [c for c in cells if c[0] in args.only.split(",")]
    results = {}
    for rep in range(args.reps):
        for layout in layouts:
            for workload in workloads:
                for name, start, _ in cells:
                    r = run_cell(start, LAYOUTS[layout][1], workload, args.duration, args.warmup)
                    results.setdefault((layout, name, workload), []).append(r)
                    print(f"rep {rep + 1} {layout:6} {workload:9} {name:20} {r['rps']:>9.0f} req/s  "
                          f"p50 {r['p50']:.2f} ms  p99 {r['p99']:.2f} ms  cpu {r['cpu_us']:.1f} us/req  "
                          f"primary {r['primary_us']:.1f} us/req  cpu1 {r['cpu1_busy']:.0f}%  "
                          f"errors {r['errors']}", flush=True)
    if args.only or args.no_write:
        return
    boot = {n: startup(n) for n in (1, 4, 16)}
    micro = micro_benchmarks()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import metrics_cost
    micro += metrics_cost.measure(HELLO)
    report = render(cells, layouts, results, boot, micro, args)
    print(report)
    path = os.path.join(ROOT, "docs/benchmarks.md")
    # tail.py's section is kept: this run does not measure it.
    report = report.rstrip("\n") + "\n" + tail_section(path)
    with open(path, "w") as f:
        f.write(report)


TAIL_HEADING = "## Requests of uneven length"


def replace_section(path, heading, section):
    """Writes `section` (which starts with `heading`) in place of the section of `path` under
    `heading` (up to the next `## ` heading), or at the end; the rest stays."""
    with open(path) as f:
        text = f.read()
    at = text.find("\n" + heading)
    if at < 0:
        text = text.rstrip("\n") + "\n\n" + section.strip("\n") + "\n"
    else:
        end = text.find("\n## ", at + 1)
        rest = "" if end < 0 else text[end:]
        text = text[:at].rstrip("\n") + "\n\n" + section.strip("\n") + "\n" + rest
    with open(path, "w") as f:
        f.write(text)


def tail_section(path):
    """The section benches/load/tail.py wrote in `path`, with a blank line before, or ''."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return ""
    at = text.find("\n" + TAIL_HEADING)
    return "" if at < 0 else text[at:]


def micro_benchmarks():
    """The criterion benchmarks of the sans-IO core and the message rates over a real link, as
    (name, figure) rows."""
    rows = []
    out = subprocess.run(["cargo", "bench", "-q", "-p", "benches", "--bench", "core", "--",
                          "--warm-up-time", "1", "--measurement-time", "3"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name, low, mid, unit, high in re.findall(
            r"^(\S.*?)\s+time:\s+\[([\d.]+) \S+ ([\d.]+) (\S+) ([\d.]+) \S+\]", out, re.M):
        rows.append((f"criterion: {name.strip()}", f"{mid} {unit} ({low}–{high})"))
    out = subprocess.run(["cargo", "run", "-q", "--release", "-p", "benches", "--bin", "messages"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if m := re.match(r"^(\S.*?)\s{2,}(\d+ msg/s)", line):
            rows.append((f"messages: {m.group(1)}", m.group(2)))
        elif m := re.match(r"^\s+\(throughput\)\s+(.+)$", line):
            rows.append(("messages: 1 MiB throughput", m.group(1).strip()))
    return rows


def med(values):
    return statistics.median(values)


def spread(values):
    return f"{min(values):,.0f}–{max(values):,.0f}"


def render(cells, layouts, results, boot, micro, args):
    machine = subprocess.run(["uname", "-sr"], capture_output=True, text=True).stdout.strip()
    model = re.search(r"model name\s*:\s*(.+)", open("/proc/cpuinfo").read())
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python3 benches/load/run.py` (this file is overwritten by it). "
        f"Machine: {os.cpu_count()} CPUs ({model.group(1) if model else 'unknown'}), {machine}. "
        f"wrk pinned to CPU 1 (`taskset -c 1 wrk -t1 -c64 -d{args.duration}s`), every server restarted for "
        f"every repetition and warmed up with {args.warmup} s of the same load before the measured run; "
        f"{args.reps} interleaved repetitions (layouts, workloads and configs interleaved inside "
        "each), medians with the range. CPU is the user+system time of every server process (primary and workers) "
        "per request. CPU 1 busy is the share of wrk's CPU in use during the run (system-wide, softirq included; "
        "in `pinned` only wrk runs there, and near 100 % means the load generator, not the server, set the rate). "
        "On 2 cores wrk itself needs one: compare ratios and CPU per request, not absolute rates.",
        "",
        "| config | what |",
        "|---|---|",
        "| cluster-rr-2 | `examples/hello`, 2 workers, round robin (the primary accepts and hands each connection over) |",
        "| cluster-rr-2-nobatch | the same with `CLUSTER_BATCH_SCHEDULING=0`: the primary's thread keeps the default scheduling policy (the lever's effect) |",
        "| cluster-rr-2-metrics | `cluster-rr-2` with the primary's metrics endpoint on (`CLUSTER_METRICS_ADDR`), `/metrics` scraped once a second |",
        "| cluster-shared-2 | the same, shared listening socket (`CLUSTER_SCHED_POLICY=none`) |",
        "| unclustered-1 | the same program, `CLUSTER_WORKERS=0`: one process, current-thread runtime |",
        "| reuseport-2 | `benches/src/bin/reuseport.rs`: 2 hyper processes with SO_REUSEPORT, no primary |",
        "| node-rr-2, node-none-2 | `benches/node/cluster.js`: Node's cluster, 2 workers |",
    ]
    for layout in layouts:
        lines += ["", f"## Layout `{layout}`: {LAYOUTS[layout][0]}"]
        for workload, title in (("keepalive", "Keep-alive (64 connections)"), ("close", "Connection churn (`Connection: close`)")):
            lines += ["", f"### {title}", "",
                      "| config | req/s | range | p50 ms | p99 ms | server CPU µs/req | primary CPU µs/req "
                      "| CPU 1 busy | errors |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for name, _, has_primary in cells:
                rs = results[(layout, name, workload)]
                primary = f"{med([r['primary_us'] for r in rs]):.1f}" if has_primary else "–"
                lines.append(f"| {name} | {med([r['rps'] for r in rs]):,.0f} | {spread([r['rps'] for r in rs])} | "
                             f"{med([r['p50'] for r in rs]):.2f} | {med([r['p99'] for r in rs]):.2f} | "
                             f"{med([r['cpu_us'] for r in rs]):.1f} | {primary} | "
                             f"{med([r['cpu1_busy'] for r in rs]):.0f} % | {sum(r['errors'] for r in rs)} |")
    lines += ["", "## Against the targets (design.md §5)", "",
              "| target | " + " | ".join(f"`{l}`" for l in layouts) + " |",
              "|---|" + "---|" * len(layouts)]

    def row(target, value):
        lines.append(f"| {target} | " + " | ".join(value(l) for l in layouts) + " |")

    def rps(layout, name, workload):
        rs = results.get((layout, name, workload))
        return med([r["rps"] for r in rs]) if rs else float("nan")

    def cpu(layout, name, workload):
        return med([r["cpu_us"] for r in results[(layout, name, workload)]])

    row("churn ≥ 3× Node cluster rr", lambda l: f"{rps(l, 'cluster-rr-2', 'close') / rps(l, 'node-rr-2', 'close'):.2f}×")

    def ceiling(layout):
        name = max((n for n, _, _ in cells), key=lambda n: rps(layout, n, "close"))
        busy = med([r["cpu1_busy"] for r in results[(layout, "cluster-rr-2", "close")]])
        return (f"3× Node: {3 * rps(layout, 'node-rr-2', 'close'):,.0f}; fastest server: "
                f"{rps(layout, name, 'close'):,.0f} ({name}); CPU 1 {busy:.0f} % busy under cluster-rr-2")

    row("(churn: what 3× Node takes, and the most any server did)", ceiling)
    row("(churn: Node cluster rr's server CPU per request over ours)",
        lambda l: f"{cpu(l, 'node-rr-2', 'close') / cpu(l, 'cluster-rr-2', 'close'):.2f}×")
    row("churn ≥ 0.9× (goal 1.0×) the SO_REUSEPORT server",
        lambda l: f"{rps(l, 'cluster-rr-2', 'close') / rps(l, 'reuseport-2', 'close'):.2f}×")
    row("churn server CPU ≤ 1.2× the SO_REUSEPORT server's",
        lambda l: f"{cpu(l, 'cluster-rr-2', 'close') / cpu(l, 'reuseport-2', 'close'):.2f}×")
    row("keep-alive ≥ 0.95× the SO_REUSEPORT server",
        lambda l: f"{rps(l, 'cluster-rr-2', 'keepalive') / rps(l, 'reuseport-2', 'keepalive'):.2f}×")
    row("primary CPU < 10 µs per handoff",
        lambda l: f"{med([r['primary_us'] for r in results[(l, 'cluster-rr-2', 'close')]]):.1f} µs")
    rr = [r for l in layouts for r in results[(l, "cluster-rr-2", "close")]]
    lines += ["", "| other target | measured |", "|---|---|",
              f"| start to all workers listening < 50 ms per worker | 1: {boot[1]:.0f} ms, 4: {boot[4]:.0f} ms, 16: {boot[16]:.0f} ms |",
              f"| primary RSS < 10 MiB | {med([r['primary_rss'] for r in rr]) / 1024:.1f} MiB (worker {med([r['worker_rss'] for r in rr]) / 1024:.1f} MiB) |",
              "", "## Hot paths", "",
              "`cargo bench -p benches --bench core` (criterion: the sans-IO core alone, no syscalls) and "
              "`cargo run --release -p benches --bin messages` (user messages over a real link, 1 worker); "
              "`python3 benches/load/metrics_cost.py` (what the metrics endpoint costs the primary: per scrape, "
              "and under churn in one process, windows with and without a scrape a second).", "",
              "| what | figure |", "|---|---|"]
    lines += [f"| {name} | {figure} |" for name, figure in micro]
    lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
