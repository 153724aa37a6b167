//! The ECS task metadata endpoint v4: which task and container the tracer
//! runs in, for the Hello. ECS sets `ECS_CONTAINER_METADATA_URI_V4` in every
//! container; `GET $URI` describes the container, `GET $URI/task` the task.

use std::collections::HashMap;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::Uri;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use crate::log::{causes, log};
use crate::proto::EcsContext;

/// Both requests together. The endpoint is the local ECS agent on a
/// link-local address and answers within milliseconds; the first Hello
/// waits for it (and so, unless `--async`, does the workload's start), so an
/// endpoint that does not answer may cost no more than this.
const TIMEOUT: Duration = Duration::from_secs(1);
/// A metadata document is a few KiB: a bigger answer is not one.
const MAX_RESPONSE: usize = 1 << 20;

/// `GET $URI`; only the fields the Hello uses.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct Container {
    docker_id: String,
    name: String,
    image: String,
    #[serde(rename = "ImageID")]
    image_id: String,
    #[serde(rename = "ContainerARN")]
    container_arn: String,
    labels: HashMap<String, String>,
}

/// `GET $URI/task`; only the fields the Hello uses.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct Task {
    cluster: String,
    #[serde(rename = "TaskARN")]
    task_arn: String,
    family: String,
    revision: String,
    availability_zone: String,
    launch_type: String,
}

/// Why a request gave nothing usable.
#[derive(Debug, PartialEq)]
struct Failure {
    url: String,
    reason: String,
}

impl Failure {
    fn new(url: impl ToString, reason: impl ToString) -> Failure {
        Failure { url: url.to_string(), reason: reason.to_string() }
    }
}

/// What the endpoint said, read once per run: `--probe-protocol auto`
/// needs it for the Hello its probe sends, and the exporter it then starts
/// must not ask (nor say it failed) again.
static READ: tokio::sync::OnceCell<Option<EcsContext>> = tokio::sync::OnceCell::const_new();

/// Starts reading the task metadata in the background when the Hello's
/// container names an endpoint (`ECS_CONTAINER_METADATA_URI_V4`).
pub fn start_fetch(hello: &crate::proto::Hello) -> Option<tokio::task::JoinHandle<Option<EcsContext>>> {
    let uri = hello.container.as_ref().map_or("", |c| c.ecs_metadata_uri.as_str()).to_owned();
    (!uri.is_empty()).then(|| tokio::spawn(async { READ.get_or_init(|| fetch(uri)).await.clone() }))
}

/// Waits for the read `start_fetch` started, the first time, and adds what
/// it said to the Hello. Bounded by the read's own timeout, which has said
/// why it failed.
pub async fn add_fetched(
    fetch: &mut Option<tokio::task::JoinHandle<Option<EcsContext>>>,
    hello: &mut crate::proto::Hello,
) {
    if let Some(fetch) = fetch.take() {
        if let Ok(Some(metadata)) = fetch.await {
            crate::context::add_ecs(hello, metadata);
        }
    }
}

/// What the endpoint at `uri` says about this task and container. On
/// failure the tracer says why in one line and goes on without it.
pub async fn fetch(uri: String) -> Option<EcsContext> {
    let client = Client::builder(TokioExecutor::new()).build_http();
    let read = async { tokio::try_join!(get::<Container>(&client, &uri, ""), get::<Task>(&client, &uri, "/task")) };
    let failure = match tokio::time::timeout(TIMEOUT, read).await {
        Ok(Ok((container, task))) => return Some(context(container, task)),
        Ok(Err(failure)) => failure,
        Err(_) => Failure::new(&uri, format_args!("no answer within {TIMEOUT:?}")),
    };
    log!("cannot read ECS metadata at {}: {}; the Hello carries the URI only", failure.url, failure.reason);
    None
}

/// `uri` with `path` appended, if it is an `http://` URI: the endpoint is
/// plain HTTP on a link-local address, and nothing else is expected there.
fn url(uri: &str, path: &str) -> Result<Uri, Failure> {
    let url = format!("{}{path}", uri.trim_end_matches('/'));
    if !url.get(..7).is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://")) {
        return Err(Failure::new(&url, "only http:// URIs are supported"));
    }
    url.parse().map_err(|e| Failure::new(&url, format_args!("not a URI: {e}")))
}

async fn get<T: serde::de::DeserializeOwned>(
    client: &Client<HttpConnector, Empty<Bytes>>,
    uri: &str,
    path: &str,
) -> Result<T, Failure> {
    let url = url(uri, path)?;
    let fail = |reason: String| Failure::new(&url, reason);
    let response = client.get(url.clone()).await.map_err(|e| fail(causes(&e)))?;
    if !response.status().is_success() {
        return Err(fail(format!("HTTP status {}", response.status())));
    }
    let body = Limited::new(response.into_body(), MAX_RESPONSE).collect().await.map_err(|e| {
        if e.is::<http_body_util::LengthLimitError>() {
            fail(format!("the answer is over {MAX_RESPONSE} bytes"))
        } else {
            fail(causes(&*e))
        }
    })?;
    serde_json::from_slice(&body.to_bytes()).map_err(|e| fail(format!("not a metadata document: {e}")))
}

/// The Hello's view of both documents. The container's labels repeat what
/// the task document says; they stand in for fields it lacks.
fn context(container: Container, task: Task) -> EcsContext {
    let mut labels = container.labels;
    let mut or_label = |field: String, label: &str| {
        let label = labels.remove(label).unwrap_or_default();
        if field.is_empty() {
            label
        } else {
            field
        }
    };
    EcsContext {
        cluster: or_label(task.cluster, "com.amazonaws.ecs.cluster"),
        task_arn: or_label(task.task_arn, "com.amazonaws.ecs.task-arn"),
        task_family: or_label(task.family, "com.amazonaws.ecs.task-definition-family"),
        task_revision: or_label(task.revision, "com.amazonaws.ecs.task-definition-version"),
        container_name: or_label(container.name, "com.amazonaws.ecs.container-name"),
        container_arn: container.container_arn,
        image: container.image,
        image_id: container.image_id,
        availability_zone: task.availability_zone,
        launch_type: task.launch_type,
        docker_id: container.docker_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(container: &str, task: &str) -> EcsContext {
        context(serde_json::from_str(container).unwrap(), serde_json::from_str(task).unwrap())
    }

    #[test]
    fn reads_the_fields_of_both_documents() {
        let container = r#"{
            "DockerId": "5b1e0c2d7f3a4e9b8c6d1f0a2b3c4d5e-1122334455",
            "Name": "web",
            "DockerName": "ecs-shop-7-web-a1b2c3d4e5f6",
            "Image": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/shop:1.4",
            "ImageID": "sha256:0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0",
            "Labels": {
                "com.amazonaws.ecs.cluster": "arn:aws:ecs:eu-west-1:123456789012:cluster/prod",
                "com.amazonaws.ecs.container-name": "web",
                "com.amazonaws.ecs.task-arn": "arn:aws:ecs:eu-west-1:123456789012:task/prod/5b1e0c2d",
                "com.amazonaws.ecs.task-definition-family": "shop",
                "com.amazonaws.ecs.task-definition-version": "7"
            },
            "DesiredStatus": "RUNNING",
            "Limits": {"CPU": 2},
            "CreatedAt": "2024-05-01T10:00:00.123456789Z",
            "ContainerARN": "arn:aws:ecs:eu-west-1:123456789012:container/prod/5b1e0c2d/0a1b2c3d",
            "Networks": [{"NetworkMode": "awsvpc", "IPv4Addresses": ["10.1.2.3"]}]
        }"#;
        let task = r#"{
            "Cluster": "arn:aws:ecs:eu-west-1:123456789012:cluster/prod",
            "TaskARN": "arn:aws:ecs:eu-west-1:123456789012:task/prod/5b1e0c2d",
            "Family": "shop",
            "Revision": "7",
            "DesiredStatus": "RUNNING",
            "Containers": [{"DockerId": "5b1e0c2d7f3a4e9b8c6d1f0a2b3c4d5e-1122334455", "Name": "web"}],
            "AvailabilityZone": "eu-west-1b",
            "LaunchType": "FARGATE"
        }"#;
        let expected = EcsContext {
            cluster: "arn:aws:ecs:eu-west-1:123456789012:cluster/prod".into(),
            task_arn: "arn:aws:ecs:eu-west-1:123456789012:task/prod/5b1e0c2d".into(),
            task_family: "shop".into(),
            task_revision: "7".into(),
            container_name: "web".into(),
            container_arn: "arn:aws:ecs:eu-west-1:123456789012:container/prod/5b1e0c2d/0a1b2c3d".into(),
            image: "123456789012.dkr.ecr.eu-west-1.amazonaws.com/shop:1.4".into(),
            image_id: "sha256:0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0".into(),
            availability_zone: "eu-west-1b".into(),
            launch_type: "FARGATE".into(),
            docker_id: "5b1e0c2d7f3a4e9b8c6d1f0a2b3c4d5e-1122334455".into(),
        };
        assert_eq!(parse(container, task), expected);
    }

    #[test]
    fn missing_fields_are_empty_and_labels_stand_in_for_the_task_document() {
        let container = r#"{"DockerId": "abc-1", "Labels": {
            "com.amazonaws.ecs.cluster": "prod",
            "com.amazonaws.ecs.task-definition-version": "3"
        }}"#;
        let expected = EcsContext {
            cluster: "prod".into(),
            task_revision: "3".into(),
            docker_id: "abc-1".into(),
            ..Default::default()
        };
        assert_eq!(parse(container, "{}"), expected);
        assert_eq!(
            parse("{}", r#"{"LaunchType": "EC2"}"#),
            EcsContext { launch_type: "EC2".into(), ..Default::default() }
        );
    }

    #[test]
    fn only_http_uris_are_fetched() {
        assert_eq!(
            url("http://169.254.170.2/v4/abc/", "/task").map(|u| u.to_string()).as_deref(),
            Ok("http://169.254.170.2/v4/abc/task")
        );
        for uri in ["https://169.254.170.2/v4/abc", "unix:/run/ecs.sock", "169.254.170.2/v4"] {
            assert_eq!(
                url(uri, "").err().map(|f| f.reason).as_deref(),
                Some("only http:// URIs are supported"),
                "{uri}"
            );
        }
        assert_eq!(url("http://[bad", "").err().map(|f| f.reason).as_deref(), Some("not a URI: invalid authority"));
    }
}
