//! The file as written: serde types that mirror `proxy.toml` key for key.
//!
//! Nothing here is trusted yet. Every table denies unknown keys, and values that
//! later validation may reject are `Spanned` so the error can name their line.
//! [`super::validate`] turns these into the typed [`super::Config`].

use serde::Deserialize;
use toml::Spanned;

use super::secret_source::SecretSource;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: RawListen,
    pub upstream: RawUpstream,
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub tokens: RawTokens,
    #[serde(default)]
    pub dates: RawDates,
    #[serde(default)]
    pub links: RawLinks,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub credentials: Vec<Spanned<RawCredential>>,
    #[serde(default)]
    pub identities: Vec<Spanned<RawIdentity>>,
    #[serde(default)]
    pub limits: Vec<Spanned<RawLimit>>,
    pub fleet: Option<Spanned<RawFleet>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    pub redis_url: Option<Spanned<SecretSource>>,
    pub key_prefix: Option<Spanned<String>>,
    pub encryption_key: Option<Spanned<SecretSource>>,
    pub lease_ms: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub proxy: Spanned<String>,
    pub admin: Spanned<String>,
    pub tls: Option<Spanned<RawListenTls>>,
    pub public_url: Option<Spanned<String>>,
    pub unprefixed: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListenTls {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
    pub client_ca: Option<Spanned<String>>,
    pub client_auth: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub base_url: Spanned<String>,
    pub token_url: Option<Spanned<String>>,
    pub ca_file: Option<Spanned<String>>,
    pub client_header: Option<Spanned<String>>,
    pub connect_timeout_ms: Option<Spanned<u64>>,
    pub request_timeout_ms: Option<Spanned<u64>>,
    pub pool_idle_timeout_ms: Option<Spanned<u64>>,
    pub pool_max_idle_per_host: Option<usize>,
    pub retry_429_max_wait_ms: Option<Spanned<u64>>,
    pub retry: Option<Spanned<RawRetry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub attempts: Option<Spanned<u32>>,
    pub retry_unsafe: Option<bool>,
    pub backoff_ms: Option<Spanned<u64>>,
    pub budget_percent: Option<Spanned<u32>>,
}

/// One `[[limits]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimit {
    pub name: Spanned<String>,
    pub methods: Option<Spanned<Vec<String>>>,
    pub path: Spanned<String>,
    pub max: Spanned<u32>,
    pub per_seconds: Spanned<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub header_read_timeout_ms: Option<Spanned<u64>>,
    pub max_header_bytes: Option<Spanned<usize>>,
    pub max_headers: Option<Spanned<usize>>,
    pub max_request_body_bytes: Option<Spanned<u64>>,
    pub shutdown_grace_ms: Option<Spanned<u64>>,
    pub idle_timeout_ms: Option<Spanned<u64>>,
    pub send_timeout_ms: Option<Spanned<u64>>,
    pub max_connections: Option<Spanned<usize>>,
    pub max_buffered_bytes: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokens {
    pub refresh_leeway_ms: Option<Spanned<u64>>,
    pub retry_min_ms: Option<Spanned<u64>>,
    pub retry_max_ms: Option<Spanned<u64>>,
    pub fetch_timeout_ms: Option<Spanned<u64>>,
    pub default_lifetime_ms: Option<Spanned<u64>>,
    pub dead_token_statuses: Option<Spanned<Vec<u16>>>,
    pub replay_max_body_bytes: Option<u64>,
    pub min_forced_refresh_interval_ms: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDates {
    pub enabled: Option<bool>,
    pub request_format: Option<Spanned<String>>,
    pub timezone: Option<Spanned<String>>,
    pub fields: Option<Vec<String>>,
    pub form_objects: Option<Vec<String>>,
    pub input_order: Option<Spanned<String>>,
    pub max_body_bytes: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLinks {
    pub enabled: Option<bool>,
    pub max_body_bytes: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<Spanned<String>>,
    pub level: Option<Spanned<String>>,
}

/// One `[[credentials]]` table. Fields of every kind live side by side here;
/// validation rejects the ones the chosen `kind` does not use.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    pub name: Spanned<String>,
    pub kind: Spanned<String>,
    pub token: Option<Spanned<SecretSource>>,
    pub client_id: Option<Spanned<String>>,
    pub client_secret: Option<Spanned<SecretSource>>,
    pub scope: Option<Spanned<String>>,
    pub username: Option<Spanned<String>>,
    pub password: Option<Spanned<SecretSource>>,
    pub application: Option<Spanned<String>>,
    pub org: Option<Spanned<String>>,
    pub email: Option<Spanned<String>>,
    pub provision: Option<Spanned<RawProvision>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvision {
    pub first_name: String,
    pub last_name: String,
    pub role: Option<String>,
    pub timezone: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    pub name: Spanned<String>,
    pub credential: Spanned<String>,
    #[serde(rename = "match")]
    pub matcher: Spanned<RawMatch>,
    pub orgs: Option<Spanned<Vec<String>>>,
    pub methods: Option<Spanned<Vec<String>>>,
    pub paths: Option<Spanned<Vec<String>>>,
    pub org_alias: Option<Spanned<String>>,
    pub date_input_order: Option<Spanned<String>>,
    pub rate_limit: Option<Spanned<RawRate>>,
    pub max_in_flight: Option<Spanned<usize>>,
}

/// `rate_limit = { per_second = 20, burst = 40 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRate {
    pub per_second: u32,
    pub burst: Option<u32>,
}

/// `match = { ... }`: exactly one of these.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    pub any: Option<bool>,
    pub api_key_sha256: Option<String>,
    pub basic: Option<RawBasic>,
    pub client_cert: Option<String>,
    pub source: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBasic {
    pub user: String,
    pub password_sha256: String,
}
