//! The sandbox's records (users, tasks, runs, guests) and how they look as JSON.

use jiff::civil::DateTime;
use serde_json::{Map, Value, json};

use super::dates::{response_date, response_date_value};
use super::fixtures::ORG_ID;

pub(super) struct User {
    pub id: u64,
    pub email: String,
    pub first_name: String,
    pub last_name: String,
    pub role: String,
    pub timezone: String,
    pub created_at: DateTime,
}

pub(super) struct Task {
    pub id: String,
    pub title: String,
    pub task_type: String,
    /// `{"users":[ids],"guests":[emails],"groups":[ids]}` as the client sent it.
    pub owners: Value,
    pub deadline: DateTime,
    pub started_at: Option<DateTime>,
    pub run_id: Option<String>,
    pub step_id: Option<String>,
    /// Form values; dates already in response format.
    pub taskdata: Map<String, Value>,
    pub created_at: DateTime,
    pub updated_at: DateTime,
}

pub(super) struct Run {
    pub id: String,
    pub name: String,
    pub checklist_id: String,
    /// Kick-off form values; dates already in response format.
    pub prerun: Map<String, Value>,
    pub created_at: DateTime,
    pub task_ids: Vec<String>,
}

pub(super) struct Guest {
    pub id: String,
    pub email: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub external_date_creation: Option<DateTime>,
    pub created_at: DateTime,
}

#[derive(Default)]
pub(super) struct Store {
    pub users: Vec<User>,
    pub tasks: Vec<Task>,
    pub runs: Vec<Run>,
    pub guests: Vec<Guest>,
}

impl Store {
    /// Emails compare case-insensitively, as in Tallyfy.
    pub fn user(&self, email: &str) -> Option<&User> {
        self.users.iter().find(|u| u.email.eq_ignore_ascii_case(email))
    }

    pub fn next_user_id(&self) -> u64 {
        self.users.iter().map(|u| u.id).max().unwrap_or(10_000) + 1
    }

    pub fn task(&self, id: &str) -> Option<&Task> {
        self.tasks.iter().find(|t| t.id == id)
    }

    pub fn task_mut(&mut self, id: &str) -> Option<&mut Task> {
        self.tasks.iter_mut().find(|t| t.id == id)
    }

    pub fn run(&self, id: &str) -> Option<&Run> {
        self.runs.iter().find(|r| r.id == id)
    }

    /// A run as JSON; with its tasks when `with_tasks`.
    pub fn run_json(&self, run: &Run, with_tasks: bool) -> Value {
        let mut value = run.to_json();
        if with_tasks {
            let tasks: Vec<Value> =
                run.task_ids.iter().filter_map(|id| self.task(id)).map(Task::to_json).collect();
            value["tasks"] = json!({ "data": tasks });
        }
        value
    }
}

impl User {
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "email": self.email,
            "first_name": self.first_name,
            "last_name": self.last_name,
            "full_name": format!("{} {}", self.first_name, self.last_name),
            "role": self.role,
            "timezone": self.timezone,
            "status": "active",
            "organization_id": ORG_ID,
            "created_at": response_date(self.created_at),
        })
    }
}

impl Task {
    /// Whether `user_id` is among the task's assignees.
    pub fn is_assigned_to(&self, user_id: u64) -> bool {
        self.owners["users"].as_array().is_some_and(|users| users.iter().any(|u| u.as_u64() == Some(user_id)))
    }

    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "title": self.title,
            "task_type": self.task_type,
            "status": "not-started",
            "owners": self.owners,
            "deadline": response_date(self.deadline),
            "started_at": response_date_value(self.started_at),
            "run_id": self.run_id,
            "step_id": self.step_id,
            "taskdata": self.taskdata,
            "created_at": response_date(self.created_at),
            "last_updated": response_date(self.updated_at),
        })
    }
}

impl Run {
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "checklist_id": self.checklist_id,
            "status": "active",
            "prerun": self.prerun,
            "started_at": response_date(self.created_at),
            "created_at": response_date(self.created_at),
        })
    }
}

impl Guest {
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "email": self.email,
            "first_name": self.first_name,
            "last_name": self.last_name,
            "external_date_creation": response_date_value(self.external_date_creation),
            "created_at": response_date(self.created_at),
        })
    }
}

/// Owners JSON for a list of user IDs.
pub(super) fn owners(user_ids: &[u64]) -> Value {
    json!({ "users": user_ids, "guests": [], "groups": [] })
}
