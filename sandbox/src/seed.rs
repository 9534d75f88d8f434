//! The records a fresh sandbox starts with: two users, tasks assigned to each,
//! and runs of the fixture checklist, all with deterministic IDs and dates so
//! pagination has several pages.

use jiff::civil::{DateTime, date};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::dates::{plus_days, response_date};
use super::encoding::hex;
use super::fixtures::{
    APP_USER_EMAIL, CHECKLIST_ID, PRERUN_DATE_FIELD, PRERUN_TEXT_FIELD, SEEDED_APP_USER_TASKS, SEEDED_RUNS,
    SEEDED_USER_TASKS, STEP_IDS, USERNAME,
};
use super::store::{Run, Store, Task, User, owners};

/// Titles of the tasks a run of the fixture checklist creates, one per step.
pub(super) const STEP_TITLES: [&str; 3] = ["Collect documents", "Review contract", "Kick-off call"];

const TASK_TITLES: [&str; 5] = [
    "Review vendor contract",
    "Approve invoice",
    "Update CRM record",
    "Prepare Q3 report",
    "Call back client",
];

/// A 32-hex ID derived from `label`, stable across runs.
pub(super) fn stable_id(label: &str) -> String {
    hex(&Sha256::digest(label.as_bytes())[..16])
}

fn epoch() -> DateTime {
    date(2025, 6, 1).at(9, 0, 0, 0)
}

pub(super) fn store() -> Store {
    let mut store = Store::default();
    for (id, email, first, last, role) in
        [(10_001, USERNAME, "Alex", "Morgan", "admin"), (10_002, APP_USER_EMAIL, "Sam", "Lee", "standard")]
    {
        store.users.push(User {
            id,
            email: email.to_owned(),
            first_name: first.to_owned(),
            last_name: last.to_owned(),
            role: role.to_owned(),
            timezone: "UTC".to_owned(),
            created_at: epoch(),
        });
    }
    let assignments = std::iter::repeat_n(10_001, SEEDED_USER_TASKS)
        .chain(std::iter::repeat_n(10_002, SEEDED_APP_USER_TASKS));
    for (n, user_id) in assignments.enumerate() {
        let day = n as i64;
        store.tasks.push(task(
            stable_id(&format!("task-{n}")),
            format!("{} #{}", TASK_TITLES[n % TASK_TITLES.len()], n + 1),
            owners(&[user_id]),
            plus_days(epoch(), day),
        ));
    }
    for n in 0..SEEDED_RUNS {
        let created = plus_days(epoch(), n as i64);
        let run_id = stable_id(&format!("run-{n}"));
        let mut task_ids = Vec::new();
        for (step, (step_id, title)) in STEP_IDS.iter().zip(STEP_TITLES).enumerate() {
            let mut task =
                task(stable_id(&format!("run-{n}-step-{step}")), title.to_owned(), owners(&[]), created);
            task.deadline = plus_days(created, 7 * (step as i64 + 1));
            task.run_id = Some(run_id.clone());
            task.step_id = Some((*step_id).to_owned());
            task_ids.push(task.id.clone());
            store.tasks.push(task);
        }
        let mut prerun = Map::new();
        prerun.insert(PRERUN_TEXT_FIELD.to_owned(), Value::from(format!("Client {}", n + 1)));
        prerun.insert(PRERUN_DATE_FIELD.to_owned(), Value::from(response_date(created)));
        store.runs.push(Run {
            id: run_id,
            name: format!("Client onboarding #{}", n + 1),
            checklist_id: CHECKLIST_ID.to_owned(),
            prerun,
            created_at: created,
            task_ids,
        });
    }
    store
}

/// A standalone task created at `created`, due a week later.
fn task(id: String, title: String, owners: Value, created: DateTime) -> Task {
    Task {
        id,
        title,
        task_type: "task".to_owned(),
        owners,
        deadline: plus_days(created, 7),
        started_at: None,
        run_id: None,
        step_id: None,
        taskdata: Map::new(),
        created_at: created,
        updated_at: created,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_has_several_pages_of_everything() {
        let store = store();
        assert_eq!(store.runs.len(), SEEDED_RUNS);
        let alex = store.user(USERNAME).expect("seeded").id;
        assert_eq!(store.tasks.iter().filter(|t| t.is_assigned_to(alex)).count(), SEEDED_USER_TASKS);
        let mut ids: Vec<&str> = store.tasks.iter().map(|t| t.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), store.tasks.len(), "task IDs are unique");
    }
}
