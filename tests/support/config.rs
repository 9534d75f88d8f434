//! The one way tests, benches and the soak build a `proxy.toml`: typed pieces
//! serialised by the `toml` crate (so quoting and escaping are never by hand),
//! then parsed by the proxy's own parser, exactly as a user's file is.
//!
//! ```ignore
//! let config = TestConfig::new(&sandbox.base_url())
//!     .credential(Credential::personal("ops", Secret::Env(TOKEN_ENV)))
//!     .identity(Identity::new("billing", "ops", Match::ApiKey("billing-key")).with("methods", vec!["GET"]))
//!     .set("server", "max_headers", 20)
//!     .parse(dir.path());
//! ```

use std::path::Path;

use tallyfy_proxy::config::Config;
use tallyfy_proxy::identity::sha256;
use tallyfy_sandbox::fixtures;
use toml::{Table, Value};

/// The variable the personal-token credential reads its token from.
pub const TOKEN_ENV: &str = "TEST_TALLYFY_TOKEN";

/// The secrets configs reference as `{ env = "..." }`, looked up without
/// touching the process environment.
pub fn env(name: &str) -> Option<String> {
    let value = match name {
        TOKEN_ENV => fixtures::PERSONAL_TOKEN,
        "APP_SECRET" => fixtures::APP_CLIENT_SECRET,
        "USER_SECRET" => fixtures::USER_CLIENT_SECRET,
        "USER_PASSWORD" => fixtures::PASSWORD,
        _ => return None,
    };
    Some(value.to_owned())
}

/// A whole `proxy.toml`.
#[derive(Debug, Clone)]
pub struct TestConfig {
    doc: Table,
}

impl TestConfig {
    /// `[listen]` on ephemeral loopback ports and `[upstream]` at `base_url`;
    /// no credentials or identities yet.
    pub fn new(base_url: &str) -> TestConfig {
        TestConfig { doc: Table::new() }
            .set("listen", "proxy", "127.0.0.1:0")
            .set("listen", "admin", "127.0.0.1:0")
            .set("upstream", "base_url", base_url)
    }

    /// The usual stack: a personal-token credential `ops` and an identity
    /// `local-app` that matches anyone.
    pub fn personal_any(base_url: &str) -> TestConfig {
        TestConfig::new(base_url)
            .credential(Credential::personal("ops", Secret::Env(TOKEN_ENV)))
            .identity(Identity::new("local-app", "ops", Match::Any))
    }

    /// Sets `key` in `[section]` (`"listen"`, `"upstream"`, `"server"`,
    /// `"tokens"`, `"dates"`, `"links"`, `"log"`).
    pub fn set(mut self, section: &str, key: &str, value: impl Into<Value>) -> TestConfig {
        let table = self.doc.entry(section).or_insert_with(|| Value::Table(Table::new()));
        table.as_table_mut().expect("a section is a table").insert(key.to_owned(), value.into());
        self
    }

    pub fn credential(self, credential: Credential) -> TestConfig {
        self.push("credentials", credential.0)
    }

    /// Identities match in the order they are added.
    pub fn identity(self, identity: Identity) -> TestConfig {
        self.push("identities", identity.0)
    }

    /// A `[[limits]]` table (built with [`table`]).
    pub fn limit(self, limit: Value) -> TestConfig {
        let Value::Table(limit) = limit else { panic!("a [[limits]] entry is a table") };
        self.push("limits", limit)
    }

    fn push(mut self, array: &str, table: Table) -> TestConfig {
        let entry = self.doc.entry(array).or_insert_with(|| Value::Array(Vec::new()));
        entry.as_array_mut().expect("an array of tables").push(Value::Table(table));
        self
    }

    /// The file's text.
    pub fn text(&self) -> String {
        toml::to_string(&self.doc).expect("a TOML document")
    }

    /// Parsed as `dir/proxy.toml` (relative paths start in `dir`), with secrets
    /// from [`env`].
    pub fn parse(&self, dir: &Path) -> Config {
        let text = self.text();
        Config::parse(&text, &dir.join("proxy.toml"), &env)
            .unwrap_or_else(|e| panic!("test config is valid: {e}\n{text}"))
    }

    /// Written to `path`, for tests that run the binary or reload from disk.
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.text()).expect("write proxy.toml");
    }
}

/// Where a secret comes from.
#[derive(Debug, Clone)]
pub enum Secret {
    /// `{ env = "NAME" }`, resolved by [`env`] (or the binary's environment).
    Env(&'static str),
    /// `{ file = "PATH" }`, relative to the config's directory.
    File(&'static str),
}

impl From<Secret> for Value {
    fn from(secret: Secret) -> Value {
        let (key, value) = match secret {
            Secret::Env(name) => ("env", name),
            Secret::File(path) => ("file", path),
        };
        table([(key, Value::from(value))])
    }
}

/// A `[[credentials]]` table.
#[derive(Debug, Clone)]
pub struct Credential(Table);

impl Credential {
    pub fn personal(name: &str, token: Secret) -> Credential {
        Credential::of(name, "personal_token").with("token", token)
    }

    pub fn client_credentials(name: &str, client_id: &str, client_secret: Secret) -> Credential {
        Credential::of(name, "client_credentials")
            .with("client_id", client_id)
            .with("client_secret", client_secret)
    }

    pub fn password(
        name: &str,
        client_id: &str,
        client_secret: Secret,
        username: &str,
        password: Secret,
    ) -> Credential {
        Credential::of(name, "password")
            .with("client_id", client_id)
            .with("client_secret", client_secret)
            .with("username", username)
            .with("password", password)
    }

    pub fn application_user(name: &str, application: &str, org: &str, email: &str) -> Credential {
        Credential::of(name, "application_user")
            .with("application", application)
            .with("org", org)
            .with("email", email)
    }

    /// The `name` of the credential.
    pub fn name(&self) -> String {
        self.0.get("name").and_then(Value::as_str).unwrap_or_default().to_owned()
    }

    /// `app`: the sandbox's application client, `client_credentials`.
    pub fn fixture_app() -> Credential {
        Credential::client_credentials("app", fixtures::APP_CLIENT_ID, Secret::Env("APP_SECRET"))
    }

    /// `user`: the sandbox's user, `password` grant with refresh tokens.
    pub fn fixture_user() -> Credential {
        Credential::password(
            "user",
            fixtures::USER_CLIENT_ID,
            Secret::Env("USER_SECRET"),
            fixtures::USERNAME,
            Secret::Env("USER_PASSWORD"),
        )
    }

    /// Any other key (`scope`, `provision`, ...).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Credential {
        self.0.insert(key.to_owned(), value.into());
        self
    }

    fn of(name: &str, kind: &str) -> Credential {
        Credential(Table::new()).with("name", name).with("kind", kind)
    }
}

/// An `[[identities]]` table.
#[derive(Debug, Clone)]
pub struct Identity(Table);

impl Identity {
    pub fn new(name: &str, credential: &str, matcher: Match) -> Identity {
        Identity(Table::new()).with("name", name).with("credential", credential).with("match", matcher)
    }

    /// A policy or dates key: `orgs`, `methods`, `paths`, `org_alias`,
    /// `date_input_order`, ...
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Identity {
        self.0.insert(key.to_owned(), value.into());
        self
    }
}

/// How an identity recognises its caller. Keys and passwords are given in
/// clear and configured as their SHA-256, as `tallyfy-proxy hash-key` prints.
#[derive(Debug, Clone)]
pub enum Match {
    Any,
    ApiKey(&'static str),
    Basic {
        user: &'static str,
        password: &'static str,
    },
    Source(Vec<&'static str>),
    /// `client_cert = "NAME"`: one URI SAN, DNS SAN or CN.
    ClientCert(&'static str),
}

impl From<Match> for Value {
    fn from(matcher: Match) -> Value {
        match matcher {
            Match::Any => table([("any", Value::from(true))]),
            Match::ApiKey(key) => table([("api_key_sha256", Value::from(sha256_hex(key)))]),
            Match::Basic { user, password } => table([(
                "basic",
                table([("user", Value::from(user)), ("password_sha256", Value::from(sha256_hex(password)))]),
            )]),
            Match::Source(cidrs) => table([("source", Value::from(cidrs))]),
            Match::ClientCert(name) => table([("client_cert", Value::from(name))]),
        }
    }
}

/// An inline table of `pairs`.
pub fn table<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    Value::Table(pairs.into_iter().map(|(key, value)| (key.to_owned(), value)).collect())
}

/// Lowercase hex of the SHA-256 of `text`.
pub fn sha256_hex(text: &str) -> String {
    sha256(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}
