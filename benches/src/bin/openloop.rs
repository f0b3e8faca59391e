//! The tail benchmark's client: open-loop arrivals (Poisson, `RATE` per second, for `SECONDS`),
//! one request per connection (`Connection: close`) to `127.0.0.1:PORT`, `SLOW_PERCENT` % of them
//! `GET /block/<SLOW_MS>` and the rest `GET /block/<FAST_MS>`. A request's latency counts from
//! when it was due, not from when it was sent, so a client that falls behind does not hide the
//! server's queueing. Prints one line of JSON: counts and latency percentiles in milliseconds.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn var<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64*: enough randomness for arrival times and the request mix, seeded for repeatability.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        // In (0, 1]: `ln` of it is finite.
        ((x >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

async fn request(port: u16, path: String) -> std::io::Result<()> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    if response.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(std::io::Error::other("not a 200"))
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[at.clamp(1, sorted.len()) - 1]
}

fn main() {
    let port: u16 = var("PORT", 3000);
    let rate: f64 = var("RATE", 1000.0);
    let seconds: f64 = var("SECONDS", 10.0);
    let slow_percent: f64 = var("SLOW_PERCENT", 5.0);
    let slow_ms: u64 = var("SLOW_MS", 50);
    let fast_ms: u64 = var("FAST_MS", 1);
    let mut rng = Rng(var("SEED", 0x9e37_79b9_7f4a_7c15));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (latencies, errors) = runtime.block_on(async move {
        let start = Instant::now() + Duration::from_millis(50);
        let end = start + Duration::from_secs_f64(seconds);
        let mut due = start;
        let mut tasks = Vec::new();
        while due < end {
            tokio::time::sleep_until(due.into()).await;
            let ms = if rng.unit() * 100.0 < slow_percent {
                slow_ms
            } else {
                fast_ms
            };
            let at = due;
            tasks.push(tokio::spawn(async move {
                let result = tokio::time::timeout(
                    Duration::from_secs(30),
                    request(port, format!("/block/{ms}")),
                )
                .await;
                match result {
                    Ok(Ok(())) => Ok(at.elapsed().as_secs_f64() * 1000.0),
                    _ => Err(()),
                }
            }));
            due += Duration::from_secs_f64(-rng.unit().ln() / rate);
        }
        let mut latencies = Vec::with_capacity(tasks.len());
        let mut errors = 0usize;
        for task in tasks {
            match task.await {
                Ok(Ok(ms)) => latencies.push(ms),
                _ => errors += 1,
            }
        }
        (latencies, errors)
    });
    let mut sorted = latencies;
    sorted.sort_by(f64::total_cmp);
    println!(
        "{{\"requests\":{},\"errors\":{},\"p50\":{:.2},\"p90\":{:.2},\"p99\":{:.2},\"p999\":{:.2},\"max\":{:.2}}}",
        sorted.len() + errors,
        errors,
        percentile(&sorted, 50.0),
        percentile(&sorted, 90.0),
        percentile(&sorted, 99.0),
        percentile(&sorted, 99.9),
        sorted.last().copied().unwrap_or(f64::NAN),
    );
}
