//! Test doubles and conformance suites for AnyWork. Dev-only: nothing here ships.
//!
//! - [`store_conformance`]: the suite every [`TaskStore`](anywork_core::TaskStore) passes.
//! - [`bins`]: the real `claude` CLI (or a loud skip) and the test MCP server binary.
//! - [`fake_llm`]: a scriptable fake of the Anthropic Messages API and of OpenAI chat
//!   completions on loopback, which records every request.

pub mod bins;
pub mod fake_llm;
pub mod store_conformance;
