//! [`NativeConfig`]: which model API the native executor calls, and its limits.

use std::time::Duration;

use anywork_core::{Error, Result};

/// The Anthropic API's public endpoint.
pub const DEFAULT_ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";
/// OpenAI's public endpoint, used when `API_KEY` is set without `API_BASE_URL`.
pub const DEFAULT_OPENAI_BASE_URL: &str = "https://api.openai.com/v1";
/// The model used with `ANTHROPIC_API_KEY` when `MODEL` is not set.
pub const DEFAULT_ANTHROPIC_MODEL: &str = "claude-sonnet-4-5";

/// The message [`NativeConfig::from_env`] returns when no model API is configured.
pub const MISSING_CONFIG: &str = "the native executor has no model API configured: set \
ANTHROPIC_API_KEY (optionally ANTHROPIC_BASE_URL and MODEL) for the Anthropic Messages API, \
or API_KEY, API_BASE_URL and MODEL for an OpenAI-compatible chat completions API";

/// Which wire format to speak, where, and with which key.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Provider {
    /// The Anthropic Messages API (`POST {base_url}/v1/messages`).
    Anthropic {
        /// Sent as `x-api-key`.
        api_key: String,
        /// Without `/v1`, e.g. [`DEFAULT_ANTHROPIC_BASE_URL`].
        base_url: String,
    },
    /// An OpenAI-compatible chat completions API (`POST {base_url}/chat/completions`).
    OpenAi {
        /// Sent as `Authorization: Bearer`.
        api_key: String,
        /// Including the version path, e.g. [`DEFAULT_OPENAI_BASE_URL`].
        base_url: String,
    },
}

impl std::fmt::Debug for Provider {
    // Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (name, base_url) = match self {
            Provider::Anthropic { base_url, .. } => ("Anthropic", base_url),
            Provider::OpenAi { base_url, .. } => ("OpenAi", base_url),
        };
        f.debug_struct(name)
            .field("base_url", base_url)
            .field("api_key", &"<redacted>")
            .finish()
    }
}

impl Provider {
    /// The Anthropic API at its public endpoint.
    pub fn anthropic(api_key: impl Into<String>) -> Self {
        Provider::Anthropic {
            api_key: api_key.into(),
            base_url: DEFAULT_ANTHROPIC_BASE_URL.into(),
        }
    }

    /// An OpenAI-compatible API at `base_url` (e.g. `http://localhost:8000/v1`).
    pub fn openai(api_key: impl Into<String>, base_url: impl Into<String>) -> Self {
        Provider::OpenAi {
            api_key: api_key.into(),
            base_url: base_url.into(),
        }
    }

    /// The base URL, as configured.
    pub fn base_url(&self) -> &str {
        match self {
            Provider::Anthropic { base_url, .. } | Provider::OpenAi { base_url, .. } => base_url,
        }
    }
}

/// How failed model requests are retried: exponential backoff with jitter. Start from
/// `RetryPolicy::default()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Tries per model request, the first included (at least 1).
    pub max_attempts: u32,
    /// Wait before the first retry; doubled for every further one.
    pub initial_backoff: Duration,
    /// Longest wait between tries (also caps a server's `retry-after`).
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (0 for the first retry), without jitter.
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.min(20));
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// Everything the [`NativeExecutor`](super::NativeExecutor) needs. Build it with
/// [`NativeConfig::new`] or [`NativeConfig::from_lookup`], then set fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NativeConfig {
    /// The model API.
    pub provider: Provider,
    /// Model name sent to the API.
    pub model: String,
    /// Most model calls per task (default 50); a task that needs more fails.
    pub max_turns: u32,
    /// `max_tokens` of every model call (default 8192).
    pub max_tokens: u32,
    /// Limit for the model API to send response headers, and for the gap between two
    /// streamed events (default 300 s). A stream may last longer than this as a whole.
    pub request_timeout: Duration,
    /// Default time limit of one `bash` command (default 120 s).
    pub bash_timeout: Duration,
    /// Retries of failed model requests.
    pub retry: RetryPolicy,
    /// Longest tool output handed to the model, in bytes (default 30 000); longer output is cut.
    pub max_tool_output: usize,
    /// Time limit of one MCP tool call (default 300 s).
    pub mcp_call_timeout: Duration,
}

impl NativeConfig {
    /// A configuration for `provider` and `model` with the default limits.
    pub fn new(provider: Provider, model: impl Into<String>) -> Self {
        Self {
            provider,
            model: model.into(),
            max_turns: 50,
            max_tokens: 8192,
            request_timeout: Duration::from_secs(300),
            bash_timeout: Duration::from_secs(120),
            retry: RetryPolicy::default(),
            max_tool_output: 30_000,
            mcp_call_timeout: Duration::from_secs(300),
        }
    }

    /// Reads the configuration from the process environment; see [`NativeConfig::from_lookup`].
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `lookup` (a variable name to its value):
    ///
    /// - `ANTHROPIC_API_KEY` (+ optional `ANTHROPIC_BASE_URL`, `MODEL`): the Anthropic API;
    /// - otherwise `API_KEY` + `MODEL` (+ `API_BASE_URL`, default [`DEFAULT_OPENAI_BASE_URL`]):
    ///   an OpenAI-compatible API;
    /// - optional limits: `NATIVE_MAX_TURNS`, `NATIVE_MAX_TOKENS`, `NATIVE_BASH_TIMEOUT_SECS`,
    ///   `NATIVE_REQUEST_TIMEOUT_SECS`, `NATIVE_MAX_RETRIES`.
    ///
    /// With none of the keys set, the error is [`MISSING_CONFIG`], which names the variables.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let model = get("MODEL");
        let mut config = if let Some(api_key) = get("ANTHROPIC_API_KEY") {
            let base_url =
                get("ANTHROPIC_BASE_URL").unwrap_or_else(|| DEFAULT_ANTHROPIC_BASE_URL.to_owned());
            Self::new(
                Provider::Anthropic { api_key, base_url },
                model.unwrap_or_else(|| DEFAULT_ANTHROPIC_MODEL.to_owned()),
            )
        } else if let Some(api_key) = get("API_KEY") {
            let model = model.ok_or_else(|| {
                Error::invalid_input(
                    "API_KEY is set but MODEL is not: set MODEL (and API_BASE_URL) for the \
                     OpenAI-compatible API",
                )
            })?;
            let base_url =
                get("API_BASE_URL").unwrap_or_else(|| DEFAULT_OPENAI_BASE_URL.to_owned());
            Self::new(Provider::OpenAi { api_key, base_url }, model)
        } else {
            return Err(Error::invalid_input(MISSING_CONFIG));
        };
        let number = |name: &str| -> Result<Option<u64>> {
            match get(name) {
                None => Ok(None),
                Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
                    Error::invalid_input(format!("{name} must be a whole number, not {v:?}"))
                }),
            }
        };
        if let Some(n) = number("NATIVE_MAX_TURNS")? {
            config.max_turns = u32::try_from(n).unwrap_or(u32::MAX).max(1);
        }
        if let Some(n) = number("NATIVE_MAX_TOKENS")? {
            config.max_tokens = u32::try_from(n).unwrap_or(u32::MAX).max(1);
        }
        if let Some(n) = number("NATIVE_BASH_TIMEOUT_SECS")? {
            config.bash_timeout = Duration::from_secs(n.max(1));
        }
        if let Some(n) = number("NATIVE_REQUEST_TIMEOUT_SECS")? {
            config.request_timeout = Duration::from_secs(n.max(1));
        }
        if let Some(n) = number("NATIVE_MAX_RETRIES")? {
            config.retry.max_attempts = u32::try_from(n).unwrap_or(u32::MAX).saturating_add(1);
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the URLs and limits.
    pub fn validate(&self) -> Result<()> {
        let url = self.provider.base_url();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(Error::invalid_input(format!(
                "the model API base URL {url:?} must start with http:// or https://"
            )));
        }
        if self.model.trim().is_empty() {
            return Err(Error::invalid_input("the model name must not be empty"));
        }
        if self.max_turns == 0 || self.max_tokens == 0 || self.retry.max_attempts == 0 {
            return Err(Error::invalid_input(
                "max_turns, max_tokens and retry.max_attempts must be at least 1",
            ));
        }
        Ok(())
    }
}
