//! Runs (processes) of the fixture checklist: the list, launching one (kick-off
//! form `prerun`, per-step `tasks.{step}.deadline`), and updating one of its
//! tasks (`deadline`, `started_at`, task form `taskdata`).

use http::StatusCode;
use serde_json::{Map, Value};

use super::auth::Caller;
use super::dates::{self, response_date};
use super::encoding::random_hex;
use super::fixtures::{
    CHECKLIST_ID, PRERUN_DATE_FIELD, PRERUN_TEXT_FIELD, STEP_IDS, TASK_DATE_FIELD, TASK_TEXT_FIELD,
};
use super::pagination::{PageRequest, paginate};
use super::respond::{self, Outcome};
use super::router::Call;
use super::seed::STEP_TITLES;
use super::store::{Run, Task, owners};
use super::validation::{self, Errors};

/// `GET .../runs`, paginated.
pub(super) fn list(call: &Call<'_>, org: &str) -> Outcome {
    let items: Vec<Value> = call.shared.lock().store.runs.iter().map(Run::to_json).collect();
    let page = paginate(items, PageRequest::from_query(call.query()), &call.org_url(org, "runs"));
    Ok(respond::php_json(StatusCode::OK, &page))
}

/// `POST .../runs`: launches [`CHECKLIST_ID`]; one task per step, assigned to the caller.
pub(super) fn launch(call: &Call<'_>, caller: &Caller) -> Outcome {
    let input = validation::json_object(call.body)?;
    let mut errors = Errors::default();
    let checklist_id = validation::required_string(&input, "checklist_id", &mut errors);
    if checklist_id.as_deref().is_some_and(|id| id != CHECKLIST_ID) {
        errors.add("checklist_id", "The selected checklist id is invalid.".to_owned());
    }
    let name = validation::required_string(&input, "name", &mut errors);
    let format = call.date_format();
    let prerun = form_values(format, &input, "prerun", (PRERUN_DATE_FIELD, PRERUN_TEXT_FIELD), &mut errors);
    let deadlines = step_deadlines(format, &input, &mut errors);
    errors.finish()?;

    let now = dates::now();
    let run_id = random_hex(32);
    let tasks: Vec<Task> = STEP_IDS
        .iter()
        .zip(STEP_TITLES)
        .enumerate()
        .map(|(index, (step_id, title))| Task {
            id: random_hex(32),
            title: title.to_owned(),
            task_type: "task".to_owned(),
            owners: owners(&[caller.user_id]),
            deadline: deadlines[index].unwrap_or_else(|| dates::plus_days(now, 7 * (index as i64 + 1))),
            started_at: None,
            run_id: Some(run_id.clone()),
            step_id: Some((*step_id).to_owned()),
            taskdata: Map::new(),
            created_at: now,
            updated_at: now,
        })
        .collect();
    let run = Run {
        id: run_id,
        name: name.unwrap_or_default(),
        checklist_id: CHECKLIST_ID.to_owned(),
        prerun: prerun.unwrap_or_default(),
        created_at: now,
        task_ids: tasks.iter().map(|t| t.id.clone()).collect(),
    };
    let mut state = call.shared.lock();
    state.store.tasks.extend(tasks);
    let body = state.store.run_json(&run, true);
    state.store.runs.push(run);
    Ok(respond::data(StatusCode::CREATED, body))
}

/// `PUT .../runs/{run}/tasks/{task}`.
pub(super) fn update_task(call: &Call<'_>, run_id: &str, task_id: &str) -> Outcome {
    let input = validation::json_object(call.body)?;
    let mut errors = Errors::default();
    let format = call.date_format();
    let deadline = dates::optional(format, &input, "deadline", &mut errors);
    let started_at = dates::optional(format, &input, "started_at", &mut errors);
    let taskdata = form_values(format, &input, "taskdata", (TASK_DATE_FIELD, TASK_TEXT_FIELD), &mut errors);
    let mut state = call.shared.lock();
    let run = state.store.run(run_id).ok_or_else(|| respond::not_found("Run"))?;
    if !run.task_ids.iter().any(|id| id == task_id) {
        return Err(respond::not_found("Task"));
    }
    errors.finish()?;
    let task = state.store.task_mut(task_id).ok_or_else(|| respond::not_found("Task"))?;
    task.deadline = deadline.unwrap_or(task.deadline);
    task.started_at = started_at.or(task.started_at);
    task.taskdata.extend(taskdata.unwrap_or_default());
    task.updated_at = dates::now();
    Ok(respond::data(StatusCode::OK, task.to_json()))
}

/// A form object (`prerun`/`taskdata`) keyed by field ID: the date field must be a
/// request-format date (stored in response format), the text field is free text,
/// other IDs are unknown fields.
fn form_values(
    format: &str,
    input: &Map<String, Value>,
    name: &str,
    (date_field, text_field): (&str, &str),
    errors: &mut Errors,
) -> Option<Map<String, Value>> {
    let fields = match input.get(name) {
        None | Some(Value::Null) => return None,
        Some(Value::Object(fields)) => fields,
        Some(_) => {
            errors.add(name, format!("The {name} must be an array."));
            return None;
        }
    };
    let mut values = Map::new();
    for (field, value) in fields {
        let path = format!("{name}.{field}");
        if field == date_field {
            if let Some(date) = dates::check(format, &path, value, errors) {
                values.insert(field.clone(), Value::String(response_date(date)));
            }
        } else if field == text_field {
            values.insert(field.clone(), value.clone());
        } else {
            errors.add(&path, "The selected field is invalid.".to_owned());
        }
    }
    Some(values)
}

/// `tasks.{step}.deadline` for each of [`STEP_IDS`], in step order.
fn step_deadlines(
    format: &str,
    input: &Map<String, Value>,
    errors: &mut Errors,
) -> Vec<Option<jiff::civil::DateTime>> {
    let mut deadlines = vec![None; STEP_IDS.len()];
    let steps = match input.get("tasks") {
        None | Some(Value::Null) => return deadlines,
        Some(Value::Object(steps)) => steps,
        Some(_) => {
            errors.add("tasks", "The tasks must be an array.".to_owned());
            return deadlines;
        }
    };
    for (step, settings) in steps {
        let Some(index) = STEP_IDS.iter().position(|id| id == step) else {
            errors.add(&format!("tasks.{step}"), "The selected step is invalid.".to_owned());
            continue;
        };
        if let Some(deadline) = settings.get("deadline").filter(|d| !d.is_null()) {
            deadlines[index] = dates::check(format, &format!("tasks.{step}.deadline"), deadline, errors);
        }
    }
    deadlines
}
