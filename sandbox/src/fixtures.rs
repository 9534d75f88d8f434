//! Well-known identifiers and credentials of the sandbox. Tests, the demo and the
//! seed data all use these; none of them is a real Tallyfy secret.

/// The organization every sandbox user, token and seeded record belongs to.
pub const ORG_ID: &str = "5a3f9c1e7b2d4e6f8a0b1c2d3e4f5a6b";
/// An organization that exists but that no sandbox token belongs to (403).
pub const OTHER_ORG_ID: &str = "0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f";

/// A static personal access token; it acts as [`USERNAME`] in [`ORG_ID`] until
/// `Sandbox::revoke_personal_token`.
pub const PERSONAL_TOKEN: &str = "sandbox-personal-token-7f3a9d2c41b84e6a9c0d5e1f2a3b4c5d";

/// The application client (`client_credentials`; mints user tokens).
pub const APP_CLIENT_ID: &str = "1001";
pub const APP_CLIENT_SECRET: &str = "sandbox-app-secret-b71c3e90d4a25f68";
/// The password-grant client (`password` and `refresh_token`).
pub const USER_CLIENT_ID: &str = "1002";
pub const USER_CLIENT_SECRET: &str = "sandbox-user-secret-4e8a1f07c9d3b256";

/// The user of the password grant and of the personal token.
pub const USERNAME: &str = "alex.morgan@example.com";
pub const PASSWORD: &str = "correct horse battery staple";
/// A second user of [`ORG_ID`], for application-minted user tokens.
pub const APP_USER_EMAIL: &str = "sam.lee@example.com";
/// A user that does not exist until `POST /api/applications/{org}/users` creates it.
pub const NEW_USER_EMAIL: &str = "new.hire@example.com";

/// The only template (blueprint) runs can be launched from.
pub const CHECKLIST_ID: &str = "b4e1c07d2f9a4b3c8e6d5f0a1b2c3d4e";
/// Kick-off form fields of [`CHECKLIST_ID`]: a date field and a free-text field.
pub const PRERUN_DATE_FIELD: &str = "9f2b6c1d3e4a5b6c7d8e9f0a1b2c3d4e";
pub const PRERUN_TEXT_FIELD: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90";
/// The steps of [`CHECKLIST_ID`]; launching a run creates one task per step.
pub const STEP_IDS: [&str; 3] = [
    "0a1b2c3d4e5f60718293a4b5c6d7e8f9",
    "1b2c3d4e5f60718293a4b5c6d7e8f90a",
    "2c3d4e5f60718293a4b5c6d7e8f90a1b",
];
/// Task form fields of every run task: a date field and a free-text field.
pub const TASK_DATE_FIELD: &str = "8c01d2e3f4a5b6c7d8e9f0a1b2c3d4e5";
pub const TASK_TEXT_FIELD: &str = "e4230f1e2d3c4b5a69788796a5b4c3d2";

/// Seeded records: tasks assigned to [`USERNAME`], to [`APP_USER_EMAIL`], and runs
/// of [`CHECKLIST_ID`] (each with one task per step).
pub const SEEDED_USER_TASKS: usize = 25;
pub const SEEDED_APP_USER_TASKS: usize = 3;
pub const SEEDED_RUNS: usize = 12;
