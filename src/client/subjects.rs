//! Every subject of the protocol, spelled once (PROTOCOL.md, "Subjects").

use batchd_actors::task::Priority;

use crate::config::NatsConfig;

/// The subjects under one prefix: `<prefix>.tasks.p<N>`,
/// `<prefix>.results.<task_id>` and `<prefix>.dlq.<id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// The subjects under `prefix` (`batchd` by default).
    pub fn new(prefix: impl Into<String>) -> Subjects {
        Subjects {
            prefix: prefix.into(),
        }
    }

    /// The subjects of a config's `nats.subject_prefix`.
    pub fn of(nats: &NatsConfig) -> Subjects {
        Subjects::new(nats.subject_prefix.as_str())
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Where tasks of priority `p` are published.
    pub fn task(&self, p: Priority) -> String {
        format!("{}.tasks.{}", self.prefix, p.token())
    }

    /// The three task subjects, by [`Priority::index`].
    pub fn tasks(&self) -> [String; 3] {
        Priority::ALL.map(|p| self.task(p))
    }

    /// Where the outcome of `task_id` is published.
    pub fn result(&self, task_id: &str) -> String {
        format!("{}{task_id}", self.results_prefix())
    }

    /// Every outcome subject: `<prefix>.results.>`.
    pub fn results(&self) -> String {
        format!("{}>", self.results_prefix())
    }

    /// The task id an outcome subject names; `None` for other subjects.
    pub fn task_id_of<'a>(&self, result_subject: &'a str) -> Option<&'a str> {
        result_subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".results.")
    }

    /// Where the dead letter of `id` is published.
    pub fn dead_letter(&self, id: &str) -> String {
        format!("{}.dlq.{id}", self.prefix)
    }

    /// Every dead-letter subject: `<prefix>.dlq.>`.
    pub fn dead_letters(&self) -> String {
        format!("{}.dlq.>", self.prefix)
    }

    fn results_prefix(&self) -> String {
        format!("{}.results.", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_protocol() {
        let s = Subjects::new("batchd");
        assert_eq!(s.task(Priority::P1), "batchd.tasks.p1");
        assert_eq!(
            s.tasks(),
            ["batchd.tasks.p1", "batchd.tasks.p2", "batchd.tasks.p3"].map(String::from)
        );
        assert_eq!(s.result("t-1"), "batchd.results.t-1");
        assert_eq!(s.results(), "batchd.results.>");
        assert_eq!(s.dead_letter("t-1"), "batchd.dlq.t-1");
        assert_eq!(s.dead_letters(), "batchd.dlq.>");
        assert_eq!(s.task_id_of("batchd.results.t-1"), Some("t-1"));
        assert_eq!(s.task_id_of("batchd.dlq.t-1"), None);
        assert_eq!(s.task_id_of("other.results.t-1"), None);
    }
}
