//! Test doubles for AnyWork. Dev-only: nothing here ships.
//!
//! - [`store_conformance`], [`driver_conformance`], [`store_conformance_tests!`]: re-exported
//!   from `anywork-conformance` (the publishable crate embedders use) for this workspace's
//!   tests.
//! - [`bins`]: the real `claude` CLI (or a loud skip) and the test MCP server binary.
//! - [`docker_image`]: the worker image for tests on a real Docker engine, built from the
//!   compiled worker binary without a registry.
//! - [`fake_k8s`]: a fake Kubernetes API server (pods, services, PVCs) on loopback whose
//!   pods run a tiny `/health` worker; it records every request and injects failures.
//! - [`fake_github`], [`fake_slack`]: fakes of the GitHub REST API (comments, reactions, App
//!   installation tokens) and the Slack Web API (messages, reactions, thread replies) that
//!   keep state, record every request and inject faults ([`fake_http`]: what they share).
//! - [`fake_llm`]: a scriptable fake of the Anthropic Messages API and of OpenAI chat
//!   completions on loopback, which records every request.
//! - [`faulty_store`]: [`FaultyStore`](faulty_store::FaultyStore), a store wrapper that
//!   injects outages (writes failing with `Unavailable` for a while, or the next N).
//! - [`original_worker`]: a stand-in of the original AnyWork's Python worker (its `/prepare`
//!   map form, SSE with the type on the `event:` line, its `/health` shape).

pub mod bins;
pub mod docker_image;
pub mod fake_git;
pub mod fake_github;
pub mod fake_http;
pub mod fake_k8s;
pub mod fake_llm;
pub mod fake_slack;
pub mod faulty_store;
pub mod original_worker;

pub use anywork_conformance::{driver_conformance, store_conformance, store_conformance_tests};
