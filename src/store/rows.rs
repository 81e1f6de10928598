//! Rows to domain values and back: the one place that knows how a mapping
//! and an event are stored, for both databases.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::{DbErr, Set};

use super::{
    entity::{self, Model as MappingRow},
    event_entity::{self, Model as EventRow},
};
use crate::mapping::{
    Actor, Event, EventKind, Generation, Holder, InvalidId, LinkAttempt, LinkToken, LinkWrite,
    ListCursor, Mapping, Prepared, StripeAccount, StripeCustomerId, UserId,
};

/// `mapping_events.kind` of a Link that created its mapping.
pub(super) const KIND_LINKED: i16 = 1;
/// `mapping_events.kind` of an Unlink.
pub(super) const KIND_UNLINKED: i16 = 2;

pub(super) fn kind_code(kind: EventKind) -> i16 {
    match kind {
        EventKind::Linked => KIND_LINKED,
        EventKind::Unlinked => KIND_UNLINKED,
    }
}

/// Rows are written only from validated ids, so a row that does not parse
/// means the table was edited by hand: an error of the database, not the
/// caller's.
fn corrupt(what: &str, id: i64, why: impl std::fmt::Display) -> DbErr {
    DbErr::Type(format!("stored {what} {id} is invalid: {why}"))
}

/// A mapping's columns, as an event or a mapping row stores them.
struct Stored<'a> {
    user_id: &'a str,
    stripe_customer_id: &'a str,
    stripe_account: &'a str,
    created_at: DateTime<Utc>,
}

fn parse_mapping(what: &str, id: i64, stored: Stored<'_>) -> Result<Mapping, DbErr> {
    let invalid = |e: InvalidId| corrupt(what, id, e);
    Ok(Mapping {
        user_id: UserId::parse(stored.user_id).map_err(invalid)?,
        stripe_customer_id: StripeCustomerId::parse(stored.stripe_customer_id).map_err(invalid)?,
        stripe_account: StripeAccount::parse(stored.stripe_account).map_err(invalid)?,
        created_at: stored.created_at,
    })
}

pub(super) fn mapping(row: &MappingRow) -> Result<Mapping, DbErr> {
    parse_mapping(
        "mapping",
        row.id,
        Stored {
            user_id: &row.user_id,
            stripe_customer_id: &row.stripe_customer_id,
            stripe_account: &row.stripe_account,
            created_at: row.created_at,
        },
    )
}

pub(super) fn holder(row: &MappingRow) -> Result<Holder, DbErr> {
    Ok(Holder {
        mapping: mapping(row)?,
        token: row.link_token.map(LinkToken::from_stored),
    })
}

pub(super) fn list_cursor(row: &MappingRow) -> ListCursor {
    ListCursor {
        created_at: row.created_at,
        id: row.id,
    }
}

pub(super) fn event(row: EventRow) -> Result<Event, DbErr> {
    let kind = match row.kind {
        KIND_LINKED => EventKind::Linked,
        KIND_UNLINKED => EventKind::Unlinked,
        other => {
            return Err(corrupt(
                "event",
                row.sequence,
                format!("unknown kind {other}"),
            ));
        }
    };
    Ok(Event {
        sequence: row.sequence,
        kind,
        mapping: parse_mapping(
            "event",
            row.sequence,
            Stored {
                user_id: &row.user_id,
                stripe_customer_id: &row.stripe_customer_id,
                stripe_account: &row.stripe_account,
                created_at: row.mapping_created_at,
            },
        )?,
        time: row.time,
        caller: row.caller,
        request_id: row.request_id,
    })
}

/// The row a Link inserts.
pub(super) fn new_mapping(write: &LinkWrite) -> entity::ActiveModel {
    let mapping = &write.mapping;
    entity::ActiveModel {
        user_id: Set(mapping.user_id.as_str().to_owned()),
        stripe_customer_id: Set(mapping.stripe_customer_id.as_str().to_owned()),
        created_at: Set(mapping.created_at),
        link_token: Set(Some(write.token.stored())),
        stripe_account: Set(mapping.stripe_account.as_str().to_owned()),
        ..Default::default()
    }
}

/// The event recording a change to `mapping` (SQLite: PostgreSQL records
/// in the change's own statement).
pub(super) fn new_event(
    kind: EventKind,
    mapping: &MappingRow,
    time: DateTime<Utc>,
    actor: &Actor,
) -> event_entity::ActiveModel {
    event_entity::ActiveModel {
        kind: Set(kind_code(kind)),
        user_id: Set(mapping.user_id.clone()),
        stripe_customer_id: Set(mapping.stripe_customer_id.clone()),
        mapping_created_at: Set(mapping.created_at),
        time: Set(time),
        caller: Set(actor.caller.clone()),
        request_id: Set(actor.request_id.clone()),
        stripe_account: Set(mapping.stripe_account.clone()),
        ..Default::default()
    }
}

/// A user's generation, counted from its Unlinked events.
pub(super) fn generation(count: i64) -> Result<Generation, DbErr> {
    Generation::new(count).ok_or_else(|| DbErr::Type(format!("a negative generation: {count}")))
}

/// What a PrepareLink's read found, on either database: the user's
/// mapping row, or else its count of Unlinked events.
pub(super) enum Found {
    Linked(MappingRow),
    Unlinked(i64),
}

pub(super) fn prepared(found: Found) -> Result<Prepared, DbErr> {
    match found {
        Found::Linked(row) => mapping(&row).map(Prepared::Linked),
        Found::Unlinked(count) => generation(count).map(Prepared::Unlinked),
    }
}

/// The one attempt of a transaction of one Link.
pub(super) fn only(attempts: Vec<LinkAttempt>) -> LinkAttempt {
    attempts.into_iter().next().unwrap_or(LinkAttempt::Again)
}

/// Each Link's attempt, from what one statement (or transaction) for all
/// of them found: the rows it inserted, and the rows holding the user or
/// the customer of a Link it did not insert, in its account. No two Links
/// share a key, so each row belongs to the Links whose user or customer it
/// holds in their account.
pub(super) fn attempts(
    writes: &[&LinkWrite],
    inserted: Vec<MappingRow>,
    holders: &[MappingRow],
) -> Result<Vec<LinkAttempt>, DbErr> {
    let mut inserted: HashMap<(String, String), MappingRow> = inserted
        .into_iter()
        .map(|row| ((row.stripe_account.clone(), row.user_id.clone()), row))
        .collect();
    let by_user: HashMap<(&str, &str), &MappingRow> = holders
        .iter()
        .map(|row| ((row.stripe_account.as_str(), row.user_id.as_str()), row))
        .collect();
    let by_customer: HashMap<(&str, &str), &MappingRow> = holders
        .iter()
        .map(|row| {
            let key = (row.stripe_account.as_str(), row.stripe_customer_id.as_str());
            (key, row)
        })
        .collect();
    writes
        .iter()
        .map(|write| {
            let wanted = &write.mapping;
            let account = wanted.stripe_account.as_str();
            let user_key = (account.to_owned(), wanted.user_id.as_str().to_owned());
            if let Some(row) = inserted.remove(&user_key) {
                return Ok(LinkAttempt::Inserted(mapping(&row)?));
            }
            let user = by_user.get(&(account, wanted.user_id.as_str())).copied();
            let customer = by_customer
                .get(&(account, wanted.stripe_customer_id.as_str()))
                .copied()
                .filter(|row| user.is_none_or(|user| user.id != row.id));
            let found = user.into_iter().chain(customer).map(holder);
            Ok(LinkAttempt::Holders(found.collect::<Result<_, _>>()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, user: &str, customer: &str) -> MappingRow {
        MappingRow {
            id,
            user_id: user.to_owned(),
            stripe_customer_id: customer.to_owned(),
            created_at: DateTime::UNIX_EPOCH,
            link_token: None,
            stripe_account: String::new(),
        }
    }

    fn write(user: &str, customer: &str) -> LinkWrite {
        LinkWrite {
            mapping: parse_mapping(
                "mapping",
                0,
                Stored {
                    user_id: user,
                    stripe_customer_id: customer,
                    stripe_account: "",
                    created_at: DateTime::UNIX_EPOCH,
                },
            )
            .expect("valid ids"),
            token: LinkToken::from_stored(0),
            time: DateTime::UNIX_EPOCH,
            actor: Actor::new(String::new(), String::new()),
            prepared: None,
        }
    }

    fn users(attempt: &LinkAttempt) -> Vec<String> {
        match attempt {
            LinkAttempt::Inserted(m) => vec![format!("+{}", m.user_id)],
            LinkAttempt::Holders(found) => found
                .iter()
                .map(|h| format!("{}:{}", h.mapping.user_id, h.mapping.stripe_customer_id))
                .collect(),
            LinkAttempt::Again => vec!["again".into()],
            LinkAttempt::Stale(_) => vec!["stale".into()],
        }
    }

    #[test]
    fn each_link_of_a_shared_statement_gets_the_rows_of_its_own_keys() {
        let writes = [
            write("new", "cus_new"),   // inserted
            write("u1", "cus_1"),      // a replay: its own row
            write("u2", "cus_other"),  // the user is taken
            write("u3", "cus_3"),      // the customer is taken (by u9)
            write("u4", "cus_4"),      // both, by two rows
            write("late", "cus_late"), // conflicted with a row it cannot see
        ];
        let writes: Vec<&LinkWrite> = writes.iter().collect();
        let holders = [
            row(1, "u1", "cus_1"),
            row(2, "u2", "cus_2"),
            row(3, "u9", "cus_3"),
            row(4, "u4", "cus_x"),
            row(5, "u8", "cus_4"),
        ];
        let attempts =
            attempts(&writes, vec![row(10, "new", "cus_new")], &holders).expect("valid rows");
        let got: Vec<Vec<String>> = attempts.iter().map(users).collect();
        assert_eq!(
            got,
            [
                vec!["+new".to_owned()],
                vec!["u1:cus_1".into()],
                vec!["u2:cus_2".into()],
                vec!["u9:cus_3".into()],
                vec!["u4:cus_x".into(), "u8:cus_4".into()],
                vec![],
            ]
        );
    }
}
