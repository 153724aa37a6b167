//! `setup`, `health`, the static binary and the guide's deployments.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::binary;
use serde_json::Value;

fn setup(dir: &Path) -> Output {
    Command::new(binary()).args(["setup", "--cws-volume-mount"]).arg(dir).output().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn setup_copies_the_binary_atomically_and_again() {
    let volume = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let output = setup(volume.path());
        assert_eq!((output.status.code(), stderr(&output)), (Some(0), String::new()));
    }
    let copy = volume.path().join("cws-instrumentation");
    assert_eq!(std::fs::metadata(&copy).unwrap().permissions().mode() & 0o7777, 0o755);
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(binary()).unwrap());
    let entries: Vec<_> = std::fs::read_dir(volume.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("cws-instrumentation")], "no temporary file left");
    let health = Command::new(&copy).arg("health").output().unwrap();
    assert_eq!((health.status.code(), health.stdout.as_slice()), (Some(0), b"OK".as_slice()));
}

#[test]
fn setup_rejects_a_missing_directory_and_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let output = setup(&missing);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr(&output),
        format!("cws-instrumentation: setup: {} does not exist (is the volume mounted there?)\n", missing.display())
    );
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    let output = setup(&file);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(stderr(&output), format!("cws-instrumentation: setup: {} is not a directory\n", file.display()));
}

#[test]
fn setup_without_permission_suggests_user_0() {
    let dir = tempfile::tempdir().unwrap();
    // Not writable but by root's override: nobody (as root) or the owner
    // (as anyone else) is refused.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
    let mut command = Command::new(binary());
    command.args(["setup", "--cws-volume-mount"]).arg(dir.path());
    if is_root() {
        use std::os::unix::process::CommandExt;
        // The test binary may sit in a directory nobody cannot enter.
        let copy = dir.path().join("runner");
        std::fs::copy(binary(), &copy).unwrap();
        command = Command::new(&copy);
        command.args(["setup", "--cws-volume-mount"]).arg(dir.path()).uid(65534).gid(65534);
    }
    let output = command.output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr(&output),
        format!(
            "cws-instrumentation: setup: cannot write to {}: permission denied; run the init container as user 0 (\"user\": \"0\" on ECS, runAsUser: 0 on Kubernetes)\n",
            dir.path().display()
        )
    );
}

#[test]
fn setup_into_a_read_only_volume_says_so() {
    if !common::require_root(&[common::CAP_SYS_ADMIN], "mount a read-only tmpfs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().display().to_string();
    // A private mount namespace: nothing is left mounted, whatever happens.
    let script = format!("mount -t tmpfs -o ro tmpfs {path} && exec {} setup --cws-volume-mount {path}", binary());
    let output =
        Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]).output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert_eq!(
        stderr(&output),
        format!("cws-instrumentation: setup: {path} is mounted read-only; mount the volume read-write in the init container\n")
    );
}

#[test]
fn the_static_binary_runs_the_guide_s_flow_in_an_empty_root() {
    if !common::require_root(&[common::CAP_SYS_ADMIN, common::CAP_SYS_CHROOT], "mount /proc and chroot") {
        return;
    }
    let Some(static_binary) = common::static_binary() else { return };
    let root = tempfile::tempdir().unwrap();
    let volume = root.path().join("cws-instrumentation-volume");
    std::fs::create_dir(&volume).unwrap();
    std::fs::create_dir(root.path().join("proc")).unwrap();
    // The init container's step, with the static binary.
    let output = Command::new(&static_binary).args(["setup", "--cws-volume-mount"]).arg(&volume).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let program = root.path().join("prog");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hello_static.c");
    let built = Command::new("cc").args(["-static", "-O1", "-o"]).arg(&program).arg(&source).status().unwrap();
    assert!(built.success(), "building a static fixture needs libc.a (libc6-dev)");
    let listing: Vec<_> = walk(root.path());
    assert_eq!(listing, vec!["cws-instrumentation-volume/cws-instrumentation", "prog"], "nothing else in the root");

    // The application container's entrypoint, in a root with nothing but
    // the two programs (and /proc, as any container has).
    let script = format!(
        "mount -t proc proc {0}/proc && exec chroot {0} /cws-instrumentation-volume/cws-instrumentation trace --probe-addr '' --events-file /events.jsonl -- /prog",
        root.path().display()
    );
    let output =
        common::command("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]).output().unwrap();
    assert_eq!(output.status.code(), Some(4), "{}", stderr(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hello from the empty root\n");
    let events: Vec<Value> = std::fs::read_to_string(root.path().join("events.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<(&str, &str, &str)> = events
        .iter()
        .map(|e| {
            let kind = ["exec", "open", "exit"].into_iter().find(|k| e.get(*k).is_some()).unwrap();
            (kind, e[kind]["path"].as_str().unwrap_or(""), e["retval"].as_str().unwrap_or(""))
        })
        .collect();
    // The workload's first descriptor is 3: it started with stdio only
    // (common::command) and the tracer handed it none of its own.
    assert_eq!(
        kinds,
        vec![("exec", "/prog", "0"), ("open", "/etc/hostname", "-2"), ("open", "/prog", "3"), ("exit", "", "")]
    );
}

/// Files under `dir`, relative, sorted.
fn walk(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    files.sort();
    files
}

/// The three command lines of a deployment: init, sidecar, application.
struct Commands {
    init: Vec<String>,
    sidecar: Vec<String>,
    app: Vec<String>,
    /// Environment variables the sidecar and the app get from a secret.
    sidecar_secrets: Vec<String>,
    app_secrets: Vec<String>,
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect()
}

fn ecs_commands() -> Commands {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/ecs-task-definition.json")).unwrap();
    let task: Value = serde_json::from_str(&text).unwrap();
    let containers = task["containerDefinitions"].as_array().unwrap();
    let named = |name: &str| containers.iter().find(|c| c["name"] == name).unwrap();
    let secrets = |name: &str| -> Vec<String> {
        named(name)["secrets"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_owned()).collect()
    };
    Commands {
        init: strings(&named("cws-instrumentation-init")["command"]),
        sidecar: strings(&named("cws-agent")["command"]),
        app: strings(&named("<YOUR_APP_NAME>")["entryPoint"]),
        sidecar_secrets: secrets("cws-agent"),
        app_secrets: secrets("<YOUR_APP_NAME>"),
    }
}

fn eks_commands() -> Commands {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/eks-deployment.yaml")).unwrap();
    let deployment: Value = serde_yaml_ng::from_str(&text).unwrap();
    let spec = &deployment["spec"]["template"]["spec"];
    let container = |list: &str, name: &str| spec[list].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap();
    let named = |list: &str, name: &str| container(list, name)["command"].clone();
    let secrets = |name: &str| -> Vec<String> {
        let env = container("containers", name)["env"].as_array().unwrap();
        let from_secret = env.iter().filter(|e| !e["valueFrom"]["secretKeyRef"].is_null());
        from_secret.map(|e| e["name"].as_str().unwrap().to_owned()).collect()
    };
    Commands {
        init: strings(&named("initContainers", "cws-instrumentation-init")),
        sidecar: strings(&named("containers", "cws-agent")),
        app: strings(&named("containers", "<YOUR_APP_NAME>")),
        sidecar_secrets: secrets("cws-agent"),
        app_secrets: secrets("<YOUR_APP_NAME>"),
    }
}

/// Runs a deployment's three command lines as its containers would, with
/// this build's binary standing for the image's and a temporary directory
/// for the shared volume.
fn run_flow(commands: Commands) {
    // The guide's command lines, unchanged.
    assert_eq!(commands.init, ["/cws-instrumentation", "setup", "--cws-volume-mount", "/cws-instrumentation-volume"]);
    assert_eq!(commands.app, ["/cws-instrumentation-volume/cws-instrumentation", "trace", "--", "<ENTRYPOINT>"]);
    assert_eq!(commands.sidecar, ["/cws-instrumentation", "serve", "--listen", "127.0.0.1:5678"]);
    // Both ends get the shared token from the same secret.
    let token_env = ["DD_CWS_INSTRUMENTATION_AUTH_TOKEN"];
    assert_eq!(
        (&commands.sidecar_secrets, &commands.app_secrets),
        (&token_env.map(String::from).to_vec(), &token_env.map(String::from).to_vec())
    );
    let token = "deploy-test-token";

    let volume = tempfile::tempdir().unwrap();
    let init = Command::new(binary())
        .args(
            commands.init[1..]
                .iter()
                .map(|a| a.replace("/cws-instrumentation-volume", &volume.path().display().to_string())),
        )
        .output()
        .unwrap();
    assert_eq!(init.status.code(), Some(0), "{}", stderr(&init));

    let mut sidecar = Command::new(binary())
        .args(&commands.sidecar[1..])
        .env(token_env[0], token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(sidecar.stderr.take().unwrap());
    let mut line = String::new();
    log.read_line(&mut line).unwrap();
    if line != "cws-instrumentation: listening on 127.0.0.1:5678\n" {
        let _ = sidecar.kill();
        panic!("the guide's sidecar must listen on 127.0.0.1:5678, which another process may hold (free the port to run this test); it said: {line}");
    }

    let entrypoint = volume.path().join("cws-instrumentation");
    let mut app: Vec<String> = commands.app[1..].to_vec();
    app.pop();
    app.extend(["sh", "-c", "cat /etc/hostname >/dev/null; exit 6"].map(String::from));
    let child = common::command(&entrypoint)
        .args(&app)
        .env(token_env[0], token)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, _, app_stderr) = common::wait(child);
    assert_eq!(status.code(), Some(6), "{app_stderr}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(sidecar.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let (status, events, _) = common::wait(sidecar);
    assert_eq!(status.code(), Some(0));
    let events: Vec<Value> = events.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let opened: Vec<_> = events.iter().filter(|e| e["open"]["path"] == "/etc/hostname").collect();
    assert_eq!(opened.len(), 1, "the app's open reached the sidecar");
    let exits: Vec<_> = events.iter().filter(|e| e["exit"]["code"] == 6).collect();
    assert_eq!(exits.len(), 1);
}

#[test]
fn the_deployments_run_the_guide_s_flow_as_written() {
    // One at a time: both sidecars listen on the guide's port.
    run_flow(ecs_commands());
    run_flow(eks_commands());
}
