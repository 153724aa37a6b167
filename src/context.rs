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

fn container_id() -> String {
    if let Ok(id) = std::env::var("DD_CONTAINER_ID") {
        return id;
    }
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    cgroup.lines().find_map(container_id_in).unwrap_or_default()
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
