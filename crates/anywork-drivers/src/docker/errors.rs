//! Docker engine errors mapped to the error kinds of the driver contract, with what to do.

use anywork_core::{Error, ErrorKind};
use bollard::errors::Error as DockerError;

use super::DockerConfig;

/// The HTTP status of an engine answer, if it was one.
pub(super) fn status_of(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

pub(super) fn is_missing_image(e: &DockerError) -> bool {
    matches!(e, DockerError::DockerResponseServerError { message, .. }
        if message.to_ascii_lowercase().contains("image"))
}

pub(super) fn engine_location(config: &DockerConfig) -> String {
    config
        .docker_host
        .clone()
        .or_else(|| std::env::var("DOCKER_HOST").ok())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".into())
}

pub(super) fn unreachable_engine(config: &DockerConfig, e: &DockerError) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!(
            "cannot reach the Docker engine at {}: {e} (is dockerd running, may this user use \
             its socket, is DOCKER_HOST right?)",
            engine_location(config)
        ),
    )
}

/// Maps an engine error to the error kinds of the driver contract.
pub(super) fn map_engine_error(config: &DockerConfig, what: &str, e: DockerError) -> Error {
    match &e {
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } => {
            let lower = message.to_ascii_lowercase();
            let resource = [
                "no space left",
                "cannot allocate memory",
                "out of memory",
                "quota",
                "too many",
                "resource temporarily unavailable",
                "could not find an available",
                "address pools have been fully subnetted",
            ]
            .iter()
            .any(|m| lower.contains(m));
            let kind = match status_code {
                _ if resource => ErrorKind::RateLimited,
                404 => ErrorKind::NotFound,
                409 => ErrorKind::Conflict,
                400 => ErrorKind::InvalidInput,
                401 | 403 => ErrorKind::Unauthorized,
                429 => ErrorKind::RateLimited,
                503 => ErrorKind::Unavailable,
                _ => ErrorKind::Internal,
            };
            let hint = if resource {
                " (the Docker host is out of a resource: free some, or lower the number of \
                 sessions / DOCKER_MEMORY_MB)"
            } else {
                ""
            };
            Error::new(
                kind,
                format!("Docker engine: {what}: {message} (HTTP {status_code}){hint}"),
            )
        }
        DockerError::RequestTimeoutError => Error::new(
            ErrorKind::Timeout,
            format!(
                "Docker engine at {}: {what} timed out",
                engine_location(config)
            ),
        ),
        DockerError::JsonDataError { .. } | DockerError::JsonSerdeError { .. } => Error::new(
            ErrorKind::Protocol,
            format!("Docker engine: {what}: unexpected answer: {e}"),
        ),
        _ => {
            let mut err = unreachable_engine(config, &e);
            err = Error::new(err.kind(), format!("{what}: {}", err.message()));
            err
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_map_to_contract_kinds() {
        let c = DockerConfig::new("img");
        let server = |status_code: u16, message: &str| DockerError::DockerResponseServerError {
            status_code,
            message: message.to_owned(),
        };
        let kind = |e| map_engine_error(&c, "x", e).kind();
        assert_eq!(kind(server(404, "no such container")), ErrorKind::NotFound);
        assert_eq!(kind(server(409, "name in use")), ErrorKind::Conflict);
        assert_eq!(
            kind(server(
                500,
                "write /var/lib/docker: no space left on device"
            )),
            ErrorKind::RateLimited
        );
        assert_eq!(
            kind(server(
                500,
                "could not find an available, non-overlapping IPv4 address pool"
            )),
            ErrorKind::RateLimited
        );
        assert_eq!(kind(server(500, "boom")), ErrorKind::Internal);
        assert_eq!(kind(DockerError::RequestTimeoutError), ErrorKind::Timeout);
        assert!(is_missing_image(&server(
            404,
            "No such image: anywork-worker:x"
        )));
        assert!(!is_missing_image(&server(404, "No such container: y")));
    }
}
