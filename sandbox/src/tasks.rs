//! Tasks: the caller's and the organization's lists, creating and updating
//! standalone tasks (`deadline`, `started_at` in the request date format).

use http::StatusCode;
use serde_json::{Map, Value};

use super::auth::Caller;
use super::dates;
use super::encoding::random_hex;
use super::pagination::{PageRequest, paginate};
use super::respond::{self, Outcome};
use super::router::Call;
use super::store::{Task, owners};
use super::validation::{self, Errors};

/// `GET .../me/tasks` (assigned to `mine`) or `GET .../tasks` (all), paginated.
pub(super) fn list(call: &Call<'_>, org: &str, mine: Option<&Caller>) -> Outcome {
    let items: Vec<Value> = {
        let state = call.shared.lock();
        state
            .store
            .tasks
            .iter()
            .filter(|task| mine.is_none_or(|caller| task.is_assigned_to(caller.user_id)))
            .map(Task::to_json)
            .collect()
    };
    let url = call.org_url(org, if mine.is_some() { "me/tasks" } else { "tasks" });
    Ok(respond::php_json(StatusCode::OK, &paginate(items, PageRequest::from_query(call.query()), &url)))
}

/// `POST .../tasks`: `title` and `deadline` required.
pub(super) fn create(call: &Call<'_>) -> Outcome {
    let input = validation::json_object(call.body)?;
    let mut errors = Errors::default();
    let title = validation::required_string(&input, "title", &mut errors);
    let deadline = dates::required(call.date_format(), &input, "deadline", &mut errors);
    let changes = Changes::read(call, &input, &mut errors);
    errors.finish()?;
    let now = dates::now();
    let mut task = Task {
        id: random_hex(32),
        title: title.unwrap_or_default(),
        task_type: "task".to_owned(),
        owners: owners(&[]),
        deadline: deadline.unwrap_or(now),
        started_at: None,
        run_id: None,
        step_id: None,
        taskdata: Map::new(),
        created_at: now,
        updated_at: now,
    };
    changes.apply(&mut task);
    let body = task.to_json();
    call.shared.lock().store.tasks.push(task);
    Ok(respond::data(StatusCode::CREATED, body))
}

/// `PUT .../tasks/{task}`: any of the task's fields.
pub(super) fn update(call: &Call<'_>, task_id: &str) -> Outcome {
    let input = validation::json_object(call.body)?;
    let mut errors = Errors::default();
    let title = validation::optional_string(&input, "title", &mut errors);
    let deadline = dates::optional(call.date_format(), &input, "deadline", &mut errors);
    let changes = Changes::read(call, &input, &mut errors);
    errors.finish()?;
    let mut state = call.shared.lock();
    let task = state.store.task_mut(task_id).ok_or_else(|| respond::not_found("Task"))?;
    if let Some(title) = title {
        task.title = title;
    }
    if let Some(deadline) = deadline {
        task.deadline = deadline;
    }
    changes.apply(task);
    task.updated_at = dates::now();
    Ok(respond::data(StatusCode::OK, task.to_json()))
}

/// Optional fields shared by create and update.
struct Changes {
    task_type: Option<String>,
    owners: Option<Value>,
    started_at: Option<jiff::civil::DateTime>,
}

impl Changes {
    fn read(call: &Call<'_>, input: &Map<String, Value>, errors: &mut Errors) -> Changes {
        let owners = match input.get("owners") {
            None | Some(Value::Null) => None,
            Some(owners @ Value::Object(_)) => Some(owners.clone()),
            Some(_) => {
                errors.add("owners", "The owners must be an array.".to_owned());
                None
            }
        };
        Changes {
            task_type: validation::optional_string(input, "task_type", errors),
            owners,
            started_at: dates::optional(call.date_format(), input, "started_at", errors),
        }
    }

    fn apply(self, task: &mut Task) {
        if let Some(task_type) = self.task_type {
            task.task_type = task_type;
        }
        if let Some(owners) = self.owners {
            task.owners = owners;
        }
        if self.started_at.is_some() {
            task.started_at = self.started_at;
        }
    }
}
