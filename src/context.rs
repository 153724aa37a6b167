//! Who is tracing what: the Hello that opens every stream to the agent.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::time::SystemTime;

use crate::proto::{ContainerContext, EcsContext, Hello, Mode};
use crate::text;

/// A random session id (128 bits, hex).
pub fn session_id() -> String {
    let mut bytes = [0u8; 16];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        // Unique enough without /dev: time and pid.
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
        bytes = (nanos ^ (u128::from(std::process::id()) << 96)).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The container id in one line of /proc/self/cgroup: a 64-hex id (docker,
/// containerd, EKS), or the last component of an ECS Fargate path
/// (`/ecs/TASK/TASK-N`).
fn container_id_in(line: &str) -> Option<String> {
    let path = line.splitn(3, ':').nth(2)?;
    for part in path.rsplit('/') {
        let part = part.trim_end_matches(".scope");
        let candidate = part.rsplit(['-', ':']).next().unwrap_or(part);
        if candidate.len() == 64 && candidate.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Some(candidate.to_owned());
        }
    }
    let mut parts = path.split('/').filter(|p| !p.is_empty());
    (parts.next() == Some("ecs")).then(|| path.rsplit('/').next().map(str::to_owned)).flatten()
}

/// A process's cgroup, as the Datadog protocol names it per message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cgroup {
    /// Empty when no line names a container.
    pub container_id: String,
    /// The cgroup v2 (`0::`) path, else the path of the line that named the
    /// container; its bytes as lossless text. Empty when neither is there.
    pub path: String,
}

/// The most of a cgroup file read: a few lines of at most a path each.
const CGROUP_FILE_LIMIT: u64 = 64 * 1024;

/// `/proc/PID/cgroup` of a process, or None when it cannot be read (gone).
/// Its cgroup names are whoever created them's, so the file is parsed as
/// bytes, bounded, and any line may be anything.
pub fn cgroup_of(pid: &str) -> Option<Cgroup> {
    let mut bytes = Vec::new();
    let file = std::fs::File::open(format!("/proc/{pid}/cgroup")).ok()?;
    file.take(CGROUP_FILE_LIMIT).read_to_end(&mut bytes).ok()?;
    Some(parse_cgroup(&bytes))
}

/// The unified hierarchy's line first (on a hybrid host, where a process
/// moved last), then the others in order.
fn parse_cgroup(bytes: &[u8]) -> Cgroup {
    let lines = bytes.split(|&b| b == b'\n');
    let (unified, others): (Vec<&[u8]>, Vec<&[u8]>) = lines.partition(|line| line.starts_with(b"0::"));
    let path = |line: &[u8]| line.splitn(3, |&b| b == b':').nth(2).map(text::lossless).unwrap_or_default();
    let named =
        unified.iter().chain(&others).find_map(|line| Some((container_id_in(&String::from_utf8_lossy(line))?, line)));
    match (named, unified.first()) {
        (Some((container_id, line)), unified) => Cgroup { container_id, path: path(unified.copied().unwrap_or(line)) },
        (None, Some(unified)) => Cgroup { container_id: String::new(), path: path(unified) },
        (None, None) => Cgroup::default(),
    }
}

fn container_id() -> String {
    if let Ok(id) = std::env::var("DD_CONTAINER_ID") {
        return id;
    }
    cgroup_of("self").map(|cgroup| cgroup.container_id).unwrap_or_default()
}

pub fn hello(entrypoint: &[std::ffi::OsString]) -> Hello {
    let env = |name| std::env::var(name).unwrap_or_default();
    Hello {
        tracer_version: env!("CARGO_PKG_VERSION").to_owned(),
        protocol_version: crate::proto::PROTOCOL_VERSION,
        session_id: session_id(),
        mode: Mode::Wrapped as i32,
        pid_namespace: std::fs::metadata("/proc/self/ns/pid").map_or(0, |m| m.ino()),
        container: Some(ContainerContext {
            id: container_id(),
            created_at: Some(crate::proto::timestamp(SystemTime::now())),
            ecs_metadata_uri: env("ECS_CONTAINER_METADATA_URI_V4"),
            pod_name: env("POD_NAME"),
            pod_namespace: env("POD_NAMESPACE"),
            // The exporter reads the endpoint, off the tracer's path: see `add_ecs`.
            ecs: None,
        }),
        entrypoint_args: entrypoint.iter().map(|a| text::lossless_os(a)).collect(),
        hostname: nix::unistd::gethostname().map(|h| text::lossless_os(&h)).unwrap_or_default(),
    }
}

/// Adds what the ECS metadata endpoint said. Its container id stands in
/// when the cgroup names none, as on Fargate with cgroup v2 (`0::/`).
pub fn add_ecs(hello: &mut Hello, ecs: EcsContext) {
    let container = hello.container.get_or_insert_with(ContainerContext::default);
    if container.id.is_empty() {
        container.id.clone_from(&ecs.docker_id);
    }
    container.ecs = Some(ecs);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_container_ids_in_cgroup_lines() {
        let id = "a".repeat(64);
        assert_eq!(container_id_in(&format!("0::/docker/{id}")), Some(id.clone()));
        assert_eq!(container_id_in(&format!("0::/system.slice/cri-containerd-{id}.scope")), Some(id.clone()));
        assert_eq!(container_id_in(&format!("11:cpu:/kubepods/besteffort/pod1234/{id}")), Some(id.clone()));
        assert_eq!(container_id_in("0::/ecs/8f2e/8f2e-3456"), Some("8f2e-3456".to_owned()));
        assert_eq!(container_id_in("0::/"), None);
    }

    #[test]
    fn a_cgroup_file_is_read_as_bytes_whatever_its_lines_hold() {
        let id = "c".repeat(64);
        let v1 = format!("12:pids:/docker/{id}\n1:name=systemd:/docker/{id}\n");
        assert_eq!(parse_cgroup(v1.as_bytes()), Cgroup { container_id: id.clone(), path: format!("/docker/{id}") });
        // Hybrid: the unified hierarchy's id first, where a process moved last.
        let moved = "d".repeat(64);
        let hybrid = format!("4:memory:/docker/{id}\n0::/docker/{moved}\n");
        let path = format!("/docker/{moved}");
        assert_eq!(parse_cgroup(hybrid.as_bytes()), Cgroup { container_id: moved, path });
        let v2 = format!("0::/system.slice/docker-{id}.scope\n");
        let path = format!("/system.slice/docker-{id}.scope");
        assert_eq!(parse_cgroup(v2.as_bytes()), Cgroup { container_id: id.clone(), path });
        // Not UTF-8, no colon, empty: a path without a container.
        assert_eq!(
            parse_cgroup(b"0::/a\xff\n\n:\nnothing"),
            Cgroup { container_id: String::new(), path: "/a\\xff".into() }
        );
        assert_eq!(parse_cgroup(b""), Cgroup::default());
        let own = cgroup_of("self").expect("this process's cgroup");
        assert!(own.path.starts_with('/') || own.path.is_empty(), "{own:?}");
    }

    #[test]
    fn the_ecs_docker_id_is_the_container_id_only_when_the_cgroup_gave_none() {
        let ecs = EcsContext { docker_id: "abc-1".into(), cluster: "prod".into(), ..Default::default() };
        let mut hello = Hello { container: Some(ContainerContext::default()), ..Default::default() };
        add_ecs(&mut hello, ecs.clone());
        let container = hello.container.unwrap_or_default();
        assert_eq!((container.id.as_str(), container.ecs.as_ref()), ("abc-1", Some(&ecs)));

        let mut hello = Hello {
            container: Some(ContainerContext { id: "b".repeat(64), ..Default::default() }),
            ..Default::default()
        };
        add_ecs(&mut hello, ecs);
        assert_eq!(hello.container.unwrap_or_default().id, "b".repeat(64));
    }
}
