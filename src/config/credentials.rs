//! `[[credentials]]`: each kind's fields, secrets resolved, unused fields refused.

use std::collections::HashSet;

use toml::Spanned;

use super::ctx::{Ctx, name, org_id};
use super::raw::RawCredential;
use super::secret_source::SecretSource;
use super::{ConfigError, Credential, CredentialKind, OAuthClient, Provision};
use crate::secret::Secret;
use crate::tokens::CredentialId;

const KINDS: &str = "personal_token, client_credentials, password or application_user";

pub(super) fn validate(
    ctx: &Ctx<'_>,
    raw: &[Spanned<RawCredential>],
    warnings: &mut Vec<String>,
) -> Result<(Vec<Credential>, Vec<Sources>), ConfigError> {
    let mut names = HashSet::new();
    for (i, credential) in raw.iter().enumerate() {
        let credential = credential.get_ref();
        if !names.insert(credential.name.get_ref().as_str()) {
            return Err(ctx.at(
                &credential.name,
                format!("credentials[{i}].name"),
                format!("duplicate credential name {:?}", credential.name.get_ref()),
            ));
        }
    }
    let credentials = raw
        .iter()
        .enumerate()
        .map(|(i, c)| one(ctx, c.get_ref(), &format!("credentials[{i}]"), raw, warnings))
        .collect::<Result<Vec<_>, _>>()?;
    if credentials.is_empty() {
        return Err(ctx.err(None, "credentials", "at least one [[credentials]] table is required"));
    }
    Ok(credentials.into_iter().unzip())
}

/// Where one credential's secrets came from.
type Sources = Vec<(&'static str, SecretSource)>;

fn one(
    ctx: &Ctx<'_>,
    raw: &RawCredential,
    key: &str,
    all: &[Spanned<RawCredential>],
    warnings: &mut Vec<String>,
) -> Result<(Credential, Sources), ConfigError> {
    let name = name(ctx, &raw.name, &format!("{key}.name"))?;
    let kind_name = raw.kind.get_ref().as_str();
    let allowed: &[&str] = match kind_name {
        "personal_token" => &["token"],
        "client_credentials" => &["client_id", "client_secret", "scope"],
        "password" => &["client_id", "client_secret", "scope", "username", "password"],
        "application_user" => &["application", "org", "email", "provision"],
        other => {
            return Err(ctx.at(
                &raw.kind,
                format!("{key}.kind"),
                format!("unknown kind {other:?}: use {KINDS}"),
            ));
        }
    };
    for (field, span) in present_fields(raw) {
        if !allowed.contains(&field) {
            return Err(ctx.err(
                Some(span),
                format!("{key}.{field}"),
                format!("is not used by kind {kind_name}"),
            ));
        }
    }
    let mut fields = Fields { ctx, raw, key, warnings, sources: Vec::new() };
    let kind = match kind_name {
        "personal_token" => {
            let token = fields.secret("token", &raw.token)?;
            if token.expose().bytes().any(|b| !(0x21..0x7f).contains(&b)) {
                let span = raw.token.as_ref().map(Spanned::span);
                return Err(ctx.err(
                    span,
                    format!("{key}.token"),
                    "holds characters a bearer token cannot (spaces or non-ASCII)",
                ));
            }
            CredentialKind::PersonalToken { token }
        }
        "client_credentials" => CredentialKind::ClientCredentials {
            client: fields.client()?,
            scope: fields.optional_text(&raw.scope),
        },
        "password" => CredentialKind::Password {
            client: fields.client()?,
            username: fields.text("username", &raw.username)?,
            password: fields.secret("password", &raw.password)?,
            scope: fields.optional_text(&raw.scope),
        },
        _application_user => {
            let application = fields.text("application", &raw.application)?;
            let index = all.iter().position(|c| c.get_ref().name.get_ref() == &application);
            let Some(index) = index.filter(|&i| all[i].get_ref().kind.get_ref() == "client_credentials")
            else {
                let span = raw.application.as_ref().map(Spanned::span);
                return Err(ctx.err(
                    span,
                    format!("{key}.application"),
                    format!("{application:?} is not a client_credentials credential"),
                ));
            };
            let org_field = raw.org.as_ref().ok_or_else(|| fields.missing("org"))?;
            let email = fields.text("email", &raw.email)?;
            if !email.contains('@') {
                let span = raw.email.as_ref().map(Spanned::span);
                return Err(ctx.err(span, format!("{key}.email"), "is not an email address"));
            }
            CredentialKind::ApplicationUser {
                application: CredentialId::new(index),
                org: org_id(ctx, org_field.get_ref(), org_field.span(), &format!("{key}.org"))?,
                email,
                provision: raw.provision.as_ref().map(|p| {
                    let p = p.get_ref();
                    Provision {
                        first_name: p.first_name.clone(),
                        last_name: p.last_name.clone(),
                        role: p.role.clone(),
                        timezone: p.timezone.clone(),
                    }
                }),
            }
        }
    };
    Ok((Credential { name, kind }, fields.sources))
}

fn present_fields(raw: &RawCredential) -> Vec<(&'static str, std::ops::Range<usize>)> {
    let mut present = Vec::new();
    let mut note = |field, span: Option<std::ops::Range<usize>>| {
        if let Some(span) = span {
            present.push((field, span));
        }
    };
    note("token", raw.token.as_ref().map(Spanned::span));
    note("client_id", raw.client_id.as_ref().map(Spanned::span));
    note("client_secret", raw.client_secret.as_ref().map(Spanned::span));
    note("scope", raw.scope.as_ref().map(Spanned::span));
    note("username", raw.username.as_ref().map(Spanned::span));
    note("password", raw.password.as_ref().map(Spanned::span));
    note("application", raw.application.as_ref().map(Spanned::span));
    note("org", raw.org.as_ref().map(Spanned::span));
    note("email", raw.email.as_ref().map(Spanned::span));
    note("provision", raw.provision.as_ref().map(Spanned::span));
    present
}

/// Reads one credential's fields, remembering where its secrets came from.
struct Fields<'c, 'a> {
    ctx: &'c Ctx<'a>,
    raw: &'c RawCredential,
    key: &'c str,
    warnings: &'c mut Vec<String>,
    sources: Vec<(&'static str, SecretSource)>,
}

impl Fields<'_, '_> {
    fn missing(&self, field: &str) -> ConfigError {
        self.ctx.at(
            &self.raw.kind,
            format!("{}.{field}", self.key),
            format!("kind {} needs {field}", self.raw.kind.get_ref()),
        )
    }

    fn text(&self, field: &str, value: &Option<Spanned<String>>) -> Result<String, ConfigError> {
        let value = value.as_ref().ok_or_else(|| self.missing(field))?;
        if value.get_ref().trim().is_empty() {
            return Err(self.ctx.at(value, format!("{}.{field}", self.key), "must not be empty"));
        }
        Ok(value.get_ref().clone())
    }

    fn optional_text(&self, value: &Option<Spanned<String>>) -> Option<String> {
        value.as_ref().map(|v| v.get_ref().clone())
    }

    fn secret(
        &mut self,
        field: &'static str,
        value: &Option<Spanned<SecretSource>>,
    ) -> Result<Secret, ConfigError> {
        let key = format!("{}.{field}", self.key);
        let source = value.as_ref().ok_or_else(|| self.missing(field))?;
        let secret = self.ctx.secret(source, &key, self.warnings)?;
        self.sources.push((field, source.get_ref().clone()));
        Ok(secret)
    }

    fn client(&mut self) -> Result<OAuthClient, ConfigError> {
        let raw = self.raw;
        Ok(OAuthClient {
            id: self.text("client_id", &raw.client_id)?,
            secret: self.secret("client_secret", &raw.client_secret)?,
        })
    }
}
