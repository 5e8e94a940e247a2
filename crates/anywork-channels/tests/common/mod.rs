//! Helpers shared by the channel tests: requests, signatures, tasks.
#![allow(dead_code)]

use anywork_channels::verify::hmac_sha256;
use anywork_core::{Inbound, InboundRequest, NewTask, SessionId, Task, TaskRequest};

/// A request with `headers` (names as given) and `body`.
pub fn request(headers: &[(&str, &str)], body: &[u8]) -> InboundRequest {
    InboundRequest::new(
        headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_owned()))
            .collect(),
        body.to_vec(),
    )
}

/// Hex HMAC-SHA256 of the concatenated parts.
pub fn sign(secret: &str, parts: &[&[u8]]) -> String {
    hex(&hmac_sha256(secret.as_bytes(), parts))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The task request of an `Inbound::Task`, or a panic saying what came instead.
pub fn task(inbound: Inbound) -> TaskRequest {
    match inbound {
        Inbound::Task(t) => *t,
        other => panic!("expected a task, got {other:?}"),
    }
}

/// The task as a store would keep it after `request` was submitted.
pub fn stored(request: TaskRequest) -> Task {
    NewTask::from_request(SessionId::new("s-test").unwrap(), request).into_task()
}
