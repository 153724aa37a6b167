//! W7: a Redis server on loopback, started under a configuration's prefix
//! and loaded by redis-benchmark (run natively). The time of the load is
//! what is compared: with a fixed number of requests it is the inverse of
//! throughput. The p99 latency comes from redis-benchmark's CSV.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{bare, parse_stats, Run};

/// Clients redis-benchmark keeps busy.
const CLIENTS: &str = "20";
/// How long a server (traced or not) may take to accept connections.
const STARTUP: Duration = Duration::from_secs(20);

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

/// Waits until the server answers PING.
fn wait_ready(port: u16) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP;
    loop {
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
            let mut reply = [0u8; 7];
            if stream.write_all(b"PING\r\n").is_ok() && stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("redis-server did not answer on port {port} within {STARTUP:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The worst p99 (ms) over the tests of redis-benchmark's `--csv` output.
fn worst_p99(csv: &str) -> Result<f64, String> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().ok_or("redis-benchmark printed nothing")?.split(',').collect();
    let column = header.iter().position(|h| h.trim_matches('"') == "p99_latency_ms").ok_or("no p99 column")?;
    lines
        .map(|line| {
            let field = line.split(',').nth(column).ok_or_else(|| format!("short line: {line}"))?;
            field.trim_matches('"').parse::<f64>().map_err(|e| format!("{field}: {e}"))
        })
        .try_fold(0f64, |worst, p99| Ok(worst.max(p99?)))
}

pub fn run_once(prefix: &[String], requests: u64) -> Result<Run, String> {
    let port = free_port()?;
    let server_argv: Vec<String> = prefix
        .iter()
        .cloned()
        .chain(
            ["redis-server", "--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"]
                .map(str::to_owned),
        )
        .collect();
    let mut server = bare(Command::new(&server_argv[0]).args(&server_argv[1..]))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", server_argv[0]))?;
    let loaded = wait_ready(port).and_then(|()| {
        let started = Instant::now();
        let output = Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-c", CLIENTS, "-n", &requests.to_string()])
            .args(["-t", "set,get", "--csv"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run redis-benchmark: {e}"))?;
        let elapsed = started.elapsed();
        if !output.status.success() {
            return Err(format!("redis-benchmark failed: {}", String::from_utf8_lossy(&output.stderr).trim()));
        }
        Ok((elapsed, worst_p99(&String::from_utf8_lossy(&output.stdout))?))
    });
    // SHUTDOWN closes the connection instead of answering; its status says nothing.
    let _ = Command::new("redis-cli").args(["-p", &port.to_string(), "shutdown", "nosave"]).output();
    if loaded.is_err() {
        let _ = server.kill();
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = server.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    let status = server.wait().map_err(|e| e.to_string())?;
    let (elapsed, p99) = loaded?;
    if !status.success() {
        return Err(format!("{server_argv:?} exited with {status}: {}", stderr.trim()));
    }
    Ok(Run { elapsed, stats: parse_stats(&stderr), p99_ms: Some(p99) })
}
