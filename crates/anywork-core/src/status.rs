//! The task state machine.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

/// Where a task is in its life.
///
/// ```text
/// pending ──► running ──► completed
///    │  ▲        │  ▲ ╲──► failed
///    │  └────────┘  │  ╲─► canceled
///    │  (requeue)   ▼
///    │       input_required ──► failed / canceled
///    └──► failed / canceled
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Persisted and queued; no worker has it yet.
    Pending,
    /// A worker is running it.
    Running,
    /// Paused until the user answers a question or a permission prompt.
    InputRequired,
    /// Finished with a result.
    Completed,
    /// Finished with an error.
    Failed,
    /// Stopped on request.
    Canceled,
}

impl TaskStatus {
    /// Every status, in life order.
    pub const ALL: [TaskStatus; 6] = [
        TaskStatus::Pending,
        TaskStatus::Running,
        TaskStatus::InputRequired,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Canceled,
    ];

    /// The snake_case name used on the wire and in databases.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Running => "running",
            TaskStatus::InputRequired => "input_required",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Canceled => "canceled",
        }
    }

    /// Whether the task can never change again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Canceled
        )
    }

    /// Whether the task still holds its session (pending, running or waiting for input).
    pub fn is_active(self) -> bool {
        !self.is_terminal()
    }

    /// The one definition of legal transitions, used by every store and the dispatcher.
    ///
    /// `running → pending` exists for crash recovery: a task whose lease expired is queued again.
    pub fn can_transition_to(self, next: TaskStatus) -> bool {
        use TaskStatus::*;
        matches!(
            (self, next),
            (Pending, Running | Failed | Canceled)
                | (
                    Running,
                    Pending | InputRequired | Completed | Failed | Canceled
                )
                | (InputRequired, Running | Failed | Canceled)
        )
    }

    /// [`can_transition_to`](Self::can_transition_to) as a `Result` with a clear message.
    pub fn check_transition(self, next: TaskStatus) -> Result<()> {
        if self.can_transition_to(next) {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::InvalidTransition,
                format!("a {self} task cannot become {next}"),
            ))
        }
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TaskStatus {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        TaskStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| Error::invalid_input(format!("unknown task status {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::TaskStatus::{self, *};

    #[test]
    fn transition_table() {
        let legal = [
            (Pending, Running),
            (Pending, Failed),
            (Pending, Canceled),
            (Running, Pending),
            (Running, InputRequired),
            (Running, Completed),
            (Running, Failed),
            (Running, Canceled),
            (InputRequired, Running),
            (InputRequired, Failed),
            (InputRequired, Canceled),
        ];
        for from in TaskStatus::ALL {
            for to in TaskStatus::ALL {
                assert_eq!(
                    from.can_transition_to(to),
                    legal.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn terminal_states_are_final() {
        for s in [Completed, Failed, Canceled] {
            assert!(s.is_terminal());
            assert!(TaskStatus::ALL.iter().all(|n| !s.can_transition_to(*n)));
        }
        let err = Completed.check_transition(Running).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidTransition);
        assert_eq!(err.to_string(), "a completed task cannot become running");
    }

    #[test]
    fn names_round_trip() {
        for s in TaskStatus::ALL {
            assert_eq!(s.as_str().parse::<TaskStatus>().unwrap(), s);
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert!("done".parse::<TaskStatus>().is_err());
    }
}
