//! Small parsers shared by the channels' `from_lookup` configurations; every error names
//! the variable to fix.

use std::time::Duration;

use anywork_core::{Error, Result};

/// `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`).
pub fn parse_bool(name: &str, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(Error::invalid_input(format!(
            "{name}={value:?}: use true or false"
        ))),
    }
}

/// A whole number of seconds.
pub fn parse_secs(name: &str, value: &str) -> Result<Duration> {
    value
        .trim()
        .parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| {
            Error::invalid_input(format!("{name}={value:?}: use a whole number of seconds"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_parsed_or_named_in_the_error() {
        assert!(parse_bool("X", "TRUE").unwrap());
        assert!(!parse_bool("X", "off").unwrap());
        assert!(
            parse_bool("X", "maybe")
                .unwrap_err()
                .to_string()
                .contains("X=")
        );
        assert_eq!(parse_secs("Y", " 30 ").unwrap(), Duration::from_secs(30));
        assert!(
            parse_secs("Y", "-1")
                .unwrap_err()
                .to_string()
                .contains("Y=")
        );
    }
}
