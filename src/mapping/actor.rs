/// Who asked for a change, recorded with it in the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The caller as the log line names it (`anonymous` without a policy).
    pub caller: String,
    /// The call's `x-request-id`.
    pub request_id: String,
}

impl Actor {
    pub fn new(caller: String, request_id: String) -> Self {
        Self { caller, request_id }
    }
}
