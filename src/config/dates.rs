//! `[dates]` and `[links]`, and the per-identity `date_input_order`.

use std::sync::Arc;

use toml::Spanned;

use super::ctx::Ctx;
use super::raw::{RawDates, RawLinks};
use super::{ConfigError, Dates, Links};
use crate::dates::{DateRules, InputOrder};

pub(super) fn dates(ctx: &Ctx<'_>, raw: &RawDates) -> Result<Dates, ConfigError> {
    let defaults = DateRules::default();
    let timezone = match &raw.timezone {
        None => defaults.timezone.clone(),
        Some(name) => jiff::tz::TimeZone::get(name.get_ref()).map_err(|e| {
            ctx.at(
                name,
                "dates.timezone",
                format!("{:?} is not a time zone name (e.g. \"Europe/Berlin\"): {e}", name.get_ref()),
            )
        })?,
    };
    let rules = DateRules {
        request_format: raw
            .request_format
            .as_ref()
            .map_or(defaults.request_format.clone(), |f| f.get_ref().clone()),
        timezone,
        fields: raw.fields.clone().unwrap_or(defaults.fields),
        form_objects: raw.form_objects.clone().unwrap_or(defaults.form_objects),
        input_order: match &raw.input_order {
            None => InputOrder::Ymd,
            Some(order) => input_order(ctx, order, "dates.input_order")?,
        },
    };
    if let Err(problem) = rules.validate() {
        let span = raw.request_format.as_ref().map(Spanned::span);
        return Err(ctx.err(span, "dates.request_format", problem));
    }
    let max_body_bytes = match &raw.max_body_bytes {
        None => 2 * 1024 * 1024,
        Some(v) if *v.get_ref() == 0 => {
            return Err(ctx.at(v, "dates.max_body_bytes", "must be greater than 0"));
        }
        Some(v) => *v.get_ref(),
    };
    Ok(Dates { enabled: raw.enabled.unwrap_or(true), rules: Arc::new(rules), max_body_bytes })
}

pub(super) fn links(ctx: &Ctx<'_>, raw: &RawLinks) -> Result<Links, ConfigError> {
    let max_body_bytes = match &raw.max_body_bytes {
        None => 1024 * 1024,
        Some(v) if *v.get_ref() == 0 => {
            return Err(ctx.at(v, "links.max_body_bytes", "must be greater than 0"));
        }
        Some(v) => *v.get_ref(),
    };
    Ok(Links { enabled: raw.enabled.unwrap_or(true), max_body_bytes })
}

pub(super) fn input_order(
    ctx: &Ctx<'_>,
    value: &Spanned<String>,
    key: &str,
) -> Result<InputOrder, ConfigError> {
    match value.get_ref().to_ascii_lowercase().as_str() {
        "ymd" => Ok(InputOrder::Ymd),
        "ydm" => Ok(InputOrder::Ydm),
        other => Err(ctx.at(value, key, format!("must be \"ymd\" or \"ydm\", not {other:?}"))),
    }
}

/// The rules one identity's requests are rewritten with.
pub(super) fn for_identity(
    ctx: &Ctx<'_>,
    dates: &Dates,
    order: Option<&Spanned<String>>,
    key: &str,
) -> Result<Option<Arc<DateRules>>, ConfigError> {
    // Checked even with rewriting off: a typo must not wait until it is turned on.
    let order = order.map(|order| input_order(ctx, order, key).map(|o| (order, o))).transpose()?;
    if !dates.enabled {
        return Ok(None);
    }
    match order {
        None => Ok(Some(dates.rules.clone())),
        Some((_, input_order)) => {
            Ok(Some(Arc::new(DateRules { input_order, ..DateRules::clone(&dates.rules) })))
        }
    }
}
