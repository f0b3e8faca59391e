//! The files in `deploy/` checked against the program they deploy: the Dockerfile builds an
//! example that exists and runs it as process 1; the Kubernetes manifest's probes are paths the
//! `hello` example's primary serves (it is started with the manifest's environment), on the port
//! its `CLUSTER_METRICS_ADDR` names; its grace period covers the shutdown delay and the drain;
//! it has no `preStop` hook; the autoscaler's metric is one the primary exports. And
//! `cluster_saturation`, the metric the autoscaler scales on, follows the connections served,
//! under both scheduling policies. No container runtime is needed.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_yaml_ng::Value;
use support::program::{Program, WAIT, free_port, get};

/// The repository's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn read(path: &str) -> String {
    let path = root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a YAML file.
fn documents(path: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(&read(path))
        .map(|document| Value::deserialize(document).unwrap())
        .collect()
}

/// The one document of `kind` in `path`.
fn object(path: &str, kind: &str) -> Value {
    let mut found: Vec<Value> = documents(path)
        .into_iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "one {kind} in {path}");
    found.remove(0)
}

const MANIFEST: &str = "deploy/kubernetes.yaml";
const AUTOSCALER: &str = "deploy/hpa.yaml";
const DOCKERFILE: &str = "deploy/Dockerfile";

/// The Deployment's one container.
fn container() -> Value {
    let deployment = object(MANIFEST, "Deployment");
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one container");
    containers[0].clone()
}

/// The container's environment, by name.
fn environment(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .map(|variable| {
            (
                variable["name"].as_str().expect("a name").to_owned(),
                variable["value"]
                    .as_str()
                    .expect("a value, as a string")
                    .to_owned(),
            )
        })
        .collect()
}

/// The port of a socket address such as `0.0.0.0:9100`.
fn port_of(address: &str) -> u16 {
    address
        .parse::<std::net::SocketAddr>()
        .unwrap_or_else(|e| panic!("{address}: {e}"))
        .port()
}

/// The number of the container port a probe or a Service names: by name, or the number itself.
fn container_port(container: &Value, port: &Value) -> u16 {
    if let Some(number) = port.as_u64() {
        return u16::try_from(number).unwrap();
    }
    let name = port.as_str().expect("a port name or number");
    let ports = container["ports"].as_sequence().expect("ports");
    let found = ports
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no container port named {name}"));
    u16::try_from(found["containerPort"].as_u64().unwrap()).unwrap()
}

/// A duration as `CLUSTER_*` variables write it (`5s`, `500ms`, `2m`, `1h`).
fn duration(text: &str) -> Duration {
    let split = text.find(|c: char| !c.is_ascii_digit()).expect("a unit");
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().expect("a whole number");
    match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number * 60),
        "h" => Duration::from_secs(number * 3600),
        _ => panic!("{text}: unknown unit"),
    }
}

/// The Dockerfile's instructions, continuation lines joined and comments left out, split into
/// stages (each from its `FROM`).
fn dockerfile_stages() -> Vec<Vec<String>> {
    let text = read(DOCKERFILE);
    let mut instructions: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Vec<String>> = Vec::new();
    for instruction in instructions {
        if instruction.to_ascii_uppercase().starts_with("FROM ") {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("the Dockerfile starts with FROM")
            .push(instruction);
    }
    stages
}

/// The arguments of `stage`'s instructions named `keyword`.
fn instructions<'a>(stage: &'a [String], keyword: &str) -> Vec<&'a str> {
    stage
        .iter()
        .filter_map(|i| {
            let (word, rest) = i.split_once(char::is_whitespace)?;
            word.eq_ignore_ascii_case(keyword).then(|| rest.trim())
        })
        .collect()
}

#[test]
fn the_dockerfile_runs_an_example_that_exists_as_process_one() {
    let stages = dockerfile_stages();
    assert!(stages.len() >= 2, "a build stage and a runtime stage");
    let build = &stages[0];
    let last = stages.last().unwrap();

    // The build stage is the official Rust image of the pinned toolchain.
    let toolchain = read("rust-toolchain.toml");
    let channel = toolchain
        .lines()
        .find_map(|l| l.strip_prefix("channel = "))
        .expect("a channel")
        .trim_matches('"');
    let image = instructions(build, "FROM")[0];
    assert!(
        image.starts_with(&format!("rust:{channel}-"))
            || image.starts_with(&format!("rust:{channel} ")),
        "the build stage's image {image:?} is not rust:{channel}"
    );

    // The last stage's ENTRYPOINT: exec form (a JSON array), the binary itself.
    let entrypoints = instructions(last, "ENTRYPOINT");
    let entrypoint = entrypoints
        .last()
        .expect("the last stage has an ENTRYPOINT");
    let argv: Vec<String> = serde_json::from_str(entrypoint)
        .unwrap_or_else(|_| panic!("ENTRYPOINT {entrypoint} is not in exec form"));
    let program = Path::new(&argv[0]);
    let binary = program.file_name().unwrap().to_str().unwrap();
    for wrapper in ["sh", "bash", "dash", "tini", "dumb-init", "env"] {
        assert_ne!(
            binary, wrapper,
            "ENTRYPOINT runs {wrapper}, not the program"
        );
    }
    assert!(
        instructions(last, "CMD").is_empty(),
        "no CMD: the program takes no arguments"
    );

    // The last stage copies that path from the build stage, which builds that example.
    let copied = instructions(last, "COPY")
        .into_iter()
        .find(|c| c.starts_with("--from=") && c.ends_with(&format!(" {}", program.display())))
        .unwrap_or_else(|| panic!("no COPY --from=.. {} in the last stage", program.display()));
    assert!(copied.starts_with("--from=build "), "{copied}");
    let built = instructions(build, "RUN").join(" ");
    assert!(
        built.contains(&format!("--example {binary} ")) && built.contains("--locked"),
        "the build stage does not build the `{binary}` example: {built}"
    );
    assert!(
        built.contains(&format!("target/release/examples/{binary} ")),
        "{built}"
    );

    // The example exists: examples/Cargo.toml declares it, and its source is there.
    let examples = read("examples/Cargo.toml");
    let declared = examples
        .split("[[example]]")
        .skip(1)
        .find(|e| e.contains(&format!("name = \"{binary}\"")))
        .unwrap_or_else(|| panic!("examples/Cargo.toml has no example {binary}"));
    let source = declared
        .lines()
        .find_map(|l| l.strip_prefix("path = "))
        .unwrap()
        .trim_matches('"');
    assert!(root().join("examples").join(source).is_file());

    // The image's endpoint port is the manifest's.
    let env = instructions(last, "ENV").join(" ");
    let metrics = env
        .split_whitespace()
        .find_map(|a| a.strip_prefix("CLUSTER_METRICS_ADDR="))
        .expect("the image sets CLUSTER_METRICS_ADDR");
    let manifest = environment(&container());
    assert_eq!(port_of(metrics), port_of(&manifest["CLUSTER_METRICS_ADDR"]));
}

#[test]
fn the_manifest_matches_the_program() {
    let deployment = object(MANIFEST, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = container();
    let env = environment(&container);

    // Every CLUSTER_* value is one the program accepts.
    let settings = cluster::Settings::new()
        .apply_env_from(|name| env.get(name).map(Into::into))
        .unwrap_or_else(|e| panic!("the manifest's environment: {e}"));

    // The probes: the endpoint's paths, on the endpoint's port.
    let endpoint = port_of(
        env.get("CLUSTER_METRICS_ADDR")
            .expect("CLUSTER_METRICS_ADDR"),
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(
            container_port(&container, &get["port"]),
            endpoint,
            "{probe}'s port is not CLUSTER_METRICS_ADDR's"
        );
    }

    // The program itself as process 1, and no preStop hook: the shutdown delay does its work.
    assert!(
        container["command"].is_null(),
        "the image's ENTRYPOINT runs"
    );
    assert!(container["args"].is_null());
    assert!(
        container["lifecycle"]["preStop"].is_null(),
        "no preStop: the program serves on through its shutdown delay"
    );

    // The grace period covers the shutdown delay and the drain.
    let delay = env
        .get("CLUSTER_SHUTDOWN_DELAY")
        .map_or(cluster::settings::KUBERNETES_SHUTDOWN_DELAY, |d| {
            duration(d)
        });
    let drain = settings.get_disconnect_timeout();
    let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30));
    assert!(
        grace > delay + drain,
        "terminationGracePeriodSeconds {grace:?} <= shutdown delay {delay:?} + drain {drain:?}"
    );

    // Requests and limits for both.
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                !container["resources"][kind][resource].is_null(),
                "resources.{kind}.{resource}"
            );
        }
    }

    // The Service sends to the application's port, which the program listens on.
    let service = object(MANIFEST, "Service");
    let selector = &service["spec"]["selector"];
    assert_eq!(
        selector,
        &deployment["spec"]["template"]["metadata"]["labels"]
    );
    let target = &service["spec"]["ports"][0]["targetPort"];
    assert_eq!(
        container_port(&container, target),
        port_of(env.get("ADDR").expect("ADDR"))
    );

    // The autoscaler scales this Deployment on the saturation gauge, per pod.
    let autoscaler = object(AUTOSCALER, "HorizontalPodAutoscaler");
    assert_eq!(autoscaler["apiVersion"].as_str(), Some("autoscaling/v2"));
    assert_eq!(
        autoscaler["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    let metric = &autoscaler["spec"]["metrics"][0];
    assert_eq!(metric["type"].as_str(), Some("Pods"));
    assert_eq!(
        metric["pods"]["metric"]["name"].as_str(),
        Some("cluster_saturation")
    );
}

/// The `hello` example running with an environment, and its workers: all SIGKILLed on drop.
struct Hello {
    program: Program,
    workers: Vec<u32>,
    /// The endpoint's port.
    endpoint: u16,
    /// The application's port.
    app: u16,
}

impl Hello {
    /// Starts it with `env`, the endpoint and the application on free ports of the loopback
    /// and `workers` workers whatever `env` says (the manifest leaves the count to the pod's CPU
    /// limit; a test machine's CPUs are another matter), outside a pod (no
    /// `KUBERNETES_SERVICE_HOST`: the delay is the one `env` sets), and waits until every worker
    /// serves.
    fn start(env: &BTreeMap<String, String>, workers: usize) -> Self {
        let endpoint = free_port();
        let app = free_port();
        let mut env = env.clone();
        env.insert(
            "CLUSTER_METRICS_ADDR".to_owned(),
            format!("127.0.0.1:{endpoint}"),
        );
        env.insert("ADDR".to_owned(), format!("127.0.0.1:{app}"));
        env.insert("CLUSTER_WORKERS".to_owned(), workers.to_string());
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let program = Program::start_with(env!("CARGO_BIN_EXE_hello"), &pairs, |command| {
            command.env_remove("KUBERNETES_SERVICE_HOST");
        });
        let mut hello = Self {
            program,
            workers: Vec::new(),
            endpoint,
            app,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            let listening = get(endpoint, "/metrics")
                .ok()
                .filter(|(status, _)| *status == 200)
                .and_then(|(_, metrics)| sample(&metrics, "cluster_workers{state=\"listening\"}"));
            if listening == Some(workers as f64) {
                break;
            }
            assert!(hello.program.is_running(), "{}", hello.program.stderr());
            assert!(
                Instant::now() < deadline,
                "hello never served with {workers} workers: {}",
                hello.program.stderr()
            );
            std::thread::yield_now();
        }
        hello.workers = cluster_tests::children(hello.program.pid());
        assert_eq!(hello.workers.len(), workers, "{:?}", hello.workers);
        hello
    }

    fn scrape(&self) -> String {
        let (status, metrics) = get(self.endpoint, "/metrics").unwrap();
        assert_eq!(status, 200, "{metrics}");
        metrics
    }
}

impl Drop for Hello {
    fn drop(&mut self) {
        for pid in &self.workers {
            let _ = cluster_tests::signal(*pid, libc::SIGKILL);
        }
    }
}

/// The value of the sample `series` (`name{labels}`, or `name`) in a scrape.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().unwrap())
    })
}

#[test]
fn the_program_serves_the_manifest_probes_and_leaves_as_it_says() {
    let container = container();
    let env = environment(&container);
    let mut hello = Hello::start(&env, 2);

    for probe in ["readinessProbe", "livenessProbe"] {
        let path = container[probe]["httpGet"]["path"].as_str().unwrap();
        let (status, body) = get(hello.endpoint, path).unwrap();
        assert_eq!(status, 200, "{probe} {path}: {body}");
    }
    let (status, body) = get(hello.app, "/").unwrap();
    assert_eq!(status, 200);
    assert!(body.starts_with("Hello from worker"), "{body}");
    let metrics = hello.scrape();
    let autoscaled = object(AUTOSCALER, "HorizontalPodAutoscaler");
    let name = autoscaled["spec"]["metrics"][0]["pods"]["metric"]["name"]
        .as_str()
        .unwrap();
    assert!(
        metrics.contains(&format!("# TYPE {name} gauge")),
        "the autoscaler's metric {name} is not exported: {metrics}"
    );

    // The pod's SIGTERM, without preStop: /readyz fails at once, and the application serves on
    // through the manifest's shutdown delay, then drains and exits 0 within the grace period.
    let terminated = Instant::now();
    hello.program.signal(libc::SIGTERM);
    let readiness = container["readinessProbe"]["httpGet"]["path"]
        .as_str()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while get(hello.endpoint, readiness).unwrap().0 != 503 {
        assert!(
            Instant::now() < deadline,
            "{readiness} never failed after SIGTERM"
        );
        std::thread::yield_now();
    }
    let liveness = container["livenessProbe"]["httpGet"]["path"]
        .as_str()
        .unwrap();
    assert_eq!(get(hello.endpoint, liveness).unwrap().0, 200);
    let delay = duration(&env["CLUSTER_SHUTDOWN_DELAY"]);
    let (status, _) = get(hello.app, "/").unwrap();
    assert_eq!(status, 200, "not serving during the shutdown delay");
    assert!(
        terminated.elapsed() < delay,
        "the request was not within the delay: the machine is too slow for this check"
    );
    let exit = hello.program.wait();
    // The primary waited for its workers: they are gone, and their pids may be reused.
    hello.workers.clear();
    assert!(exit.success(), "{exit:?}: {}", hello.program.stderr());
    let grace = Duration::from_secs(
        object(MANIFEST, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap(),
    );
    assert!(
        terminated.elapsed() >= delay && terminated.elapsed() < grace,
        "left after {:?}",
        terminated.elapsed()
    );
}

/// A connection that has had one request answered (so a worker serves it), kept open.
fn served_connection(port: u16) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(stream, "GET / HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut length = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = Some(value.trim().parse::<usize>().unwrap());
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; length.expect("a content length")];
    std::io::Read::read_exact(&mut reader, &mut body).unwrap();
    stream
}

/// Scrapes until `cluster_saturation` is `expected` (a reading of connections is reused for up
/// to 5 s), within [`WAIT`].
fn wait_saturation(hello: &Hello, expected: f64, why: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let metrics = hello.scrape();
        let value = sample(&metrics, "cluster_saturation");
        if value == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{why}: cluster_saturation is {value:?}, not {expected}: {metrics}"
        );
        std::thread::yield_now();
    }
}

#[test]
fn saturation_follows_the_connections_served_under_both_policies() {
    for policy in ["rr", "none"] {
        let env = BTreeMap::from([("CLUSTER_SCHED_POLICY".to_owned(), policy.to_owned())]);
        let hello = Hello::start(&env, 2);
        wait_saturation(&hello, 0.0, policy);

        // Six connections served by two workers: three per worker, whoever serves them.
        let held: Vec<TcpStream> = (0..6).map(|_| served_connection(hello.app)).collect();
        wait_saturation(&hello, 3.0, policy);

        drop(held);
        wait_saturation(&hello, 0.0, policy);
    }
}
