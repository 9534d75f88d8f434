//! `[[identities]]`: the match rule and the optional policy of each caller identity.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};
use toml::Spanned;

use super::ctx::{Ctx, methods, name, org_id, sha256_hex};
use super::raw::{RawIdentity, RawMatch, RawRate};
use super::{ConfigError, Credential, Dates, Identity};
use crate::identity::{Matcher, Sha256Digest};
use crate::policy::{PathPattern, Policy};
use crate::tokens::CredentialId;
use crate::traffic::{IdentityLimits, Rate};

pub(super) fn validate(
    ctx: &Ctx<'_>,
    raw: &[Spanned<RawIdentity>],
    credentials: &[Credential],
    dates: &Dates,
) -> Result<Vec<Identity>, ConfigError> {
    let mut names = HashSet::new();
    let mut reachable = Reachable::default();
    let mut identities = Vec::with_capacity(raw.len());
    for (i, spanned) in raw.iter().enumerate() {
        let raw_identity = spanned.get_ref();
        let key = format!("identities[{i}]");
        let identity = one(ctx, raw_identity, &key, credentials, dates)?;
        if !names.insert(identity.name.clone()) {
            return Err(ctx.at(
                &raw_identity.name,
                format!("{key}.name"),
                format!("duplicate identity name {:?}", identity.name),
            ));
        }
        reachable
            .check(&identity)
            .map_err(|message| ctx.at(&raw_identity.matcher, format!("{key}.match"), message))?;
        identities.push(identity);
    }
    if identities.is_empty() {
        return Err(ctx.err(
            None,
            "identities",
            "at least one [[identities]] table is required: without one every caller is refused",
        ));
    }
    Ok(identities)
}

/// The rules seen so far, to refuse one that could never match: the first
/// matching rule wins, so nothing after an `any` rule is ever reached, and a
/// key (or Basic user and password) already taken names the earlier identity.
#[derive(Default)]
struct Reachable {
    any: Option<String>,
    api_keys: HashMap<Sha256Digest, String>,
    basic: HashMap<(String, Sha256Digest), String>,
}

impl Reachable {
    fn check(&mut self, identity: &Identity) -> Result<(), String> {
        if let Some(first) = &self.any {
            return Err(format!(
                "can never match: identity {first:?} before it matches every caller (put the `any` rule last)"
            ));
        }
        let earlier = match &identity.matcher {
            Matcher::Any => {
                self.any = Some(identity.name.clone());
                None
            }
            Matcher::ApiKey { sha256 } => self.api_keys.insert(*sha256, identity.name.clone()),
            Matcher::Basic { user, password_sha256 } => {
                self.basic.insert((user.clone(), *password_sha256), identity.name.clone())
            }
            Matcher::ClientCert { .. } | Matcher::Source { .. } => None,
        };
        match earlier {
            Some(first) => Err(format!(
                "can never match: identity {first:?} has the same {}",
                if matches!(identity.matcher, Matcher::Basic { .. }) {
                    "user and password"
                } else {
                    "API key"
                }
            )),
            None => Ok(()),
        }
    }
}

fn one(
    ctx: &Ctx<'_>,
    raw: &RawIdentity,
    key: &str,
    credentials: &[Credential],
    dates: &Dates,
) -> Result<Identity, ConfigError> {
    let name = name(ctx, &raw.name, &format!("{key}.name"))?;
    if name == "-" {
        // The label of requests no identity matched, in access lines and metrics.
        return Err(ctx.at(&raw.name, format!("{key}.name"), "\"-\" names requests no identity matched"));
    }
    let wanted = raw.credential.get_ref();
    let credential =
        credentials.iter().position(|c| &c.name == wanted).map(CredentialId::new).ok_or_else(|| {
            ctx.at(
                &raw.credential,
                format!("{key}.credential"),
                format!("no [[credentials]] is named {wanted:?}"),
            )
        })?;
    let matcher = matcher(ctx, &raw.matcher, &format!("{key}.match"))?;
    let policy = policy(ctx, raw, key)?;
    let dates = super::dates::for_identity(
        ctx,
        dates,
        raw.date_input_order.as_ref(),
        &format!("{key}.date_input_order"),
    )?;
    let limits = limits(ctx, raw, key)?;
    Ok(Identity { name, credential, matcher, policy, dates, limits })
}

/// `rate_limit` and `max_in_flight`.
fn limits(ctx: &Ctx<'_>, raw: &RawIdentity, key: &str) -> Result<IdentityLimits, ConfigError> {
    let rate = match &raw.rate_limit {
        None => None,
        Some(spanned) => {
            let RawRate { per_second, burst } = spanned.get_ref();
            let (per_second, burst) = (*per_second, burst.unwrap_or(*per_second));
            if per_second == 0 || burst == 0 {
                return Err(ctx.at(
                    spanned,
                    format!("{key}.rate_limit"),
                    "per_second and burst must be at least 1",
                ));
            }
            if per_second > 1_000_000 {
                return Err(ctx.at(spanned, format!("{key}.rate_limit"), "per_second is at most 1000000"));
            }
            Some(Rate { per_second, burst })
        }
    };
    let max_in_flight = match &raw.max_in_flight {
        Some(max) if *max.get_ref() == 0 => {
            return Err(ctx.at(max, format!("{key}.max_in_flight"), "must be at least 1"));
        }
        other => other.as_ref().map(|max| *max.get_ref()),
    };
    Ok(IdentityLimits { rate, max_in_flight })
}

fn matcher(ctx: &Ctx<'_>, spanned: &Spanned<RawMatch>, key: &str) -> Result<Matcher, ConfigError> {
    let raw = spanned.get_ref();
    let given = [
        raw.any.is_some(),
        raw.api_key_sha256.is_some(),
        raw.basic.is_some(),
        raw.client_cert.is_some(),
        raw.source.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(ctx.at(
            spanned,
            key,
            "give exactly one of any, api_key_sha256, basic, client_cert or source",
        ));
    }
    let span = spanned.span();
    if let Some(any) = raw.any {
        return if any {
            Ok(Matcher::Any)
        } else {
            Err(ctx.at(spanned, key, "any = false matches no one; remove it"))
        };
    }
    if let Some(hex) = &raw.api_key_sha256 {
        return Ok(Matcher::ApiKey { sha256: sha256_hex(ctx, hex, span, &format!("{key}.api_key_sha256"))? });
    }
    if let Some(basic) = &raw.basic {
        if basic.user.is_empty() || basic.user.contains(':') {
            return Err(ctx.at(spanned, format!("{key}.basic.user"), "must be non-empty and hold no ':'"));
        }
        let password_sha256 =
            sha256_hex(ctx, &basic.password_sha256, span, &format!("{key}.basic.password_sha256"))?;
        return Ok(Matcher::Basic { user: basic.user.clone(), password_sha256 });
    }
    if let Some(name) = &raw.client_cert {
        if name.is_empty() {
            return Err(ctx.at(spanned, format!("{key}.client_cert"), "must name a URI SAN, DNS SAN or CN"));
        }
        return Ok(Matcher::ClientCert { name: name.clone() });
    }
    let sources = raw.source.as_deref().unwrap_or_default();
    if sources.is_empty() {
        return Err(ctx.at(
            spanned,
            format!("{key}.source"),
            "list at least one network, e.g. [\"127.0.0.1/32\"]",
        ));
    }
    let networks = sources
        .iter()
        .map(|s| {
            s.parse::<IpNet>().or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from)).map_err(|_| {
                ctx.at(spanned, format!("{key}.source"), format!("{s:?} is not an address or CIDR network"))
            })
        })
        .map(|net| net.map(ipv4_if_mapped))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Matcher::Source { networks })
}

/// A network of IPv4-mapped IPv6 addresses (`::ffff:10.0.0.0/104`) as the IPv4
/// network it maps: an IPv4 caller is matched by its IPv4 address, on a
/// dual-stack listener too, so the mapped form would match no one.
fn ipv4_if_mapped(net: IpNet) -> IpNet {
    let IpNet::V6(v6) = net else { return net };
    match (IpAddr::V6(v6.addr()).to_canonical(), v6.prefix_len().checked_sub(96)) {
        (IpAddr::V4(v4), Some(prefix)) => Ipv4Net::new(v4, prefix).map_or(net, IpNet::V4),
        _ => net,
    }
}

fn policy(ctx: &Ctx<'_>, raw: &RawIdentity, key: &str) -> Result<Policy, ConfigError> {
    let orgs = match &raw.orgs {
        None => None,
        Some(list) => Some(
            list.get_ref()
                .iter()
                .map(|org| org_id(ctx, org, list.span(), &format!("{key}.orgs")))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let methods =
        raw.methods.as_ref().map(|list| methods(ctx, list, &format!("{key}.methods"))).transpose()?;
    let paths = match &raw.paths {
        None => None,
        Some(list) => Some(
            list.get_ref()
                .iter()
                .map(|p| PathPattern::parse(p).map_err(|m| ctx.at(list, format!("{key}.paths"), m)))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let org_alias = match &raw.org_alias {
        None => None,
        Some(org) => Some(org_id(ctx, org.get_ref(), org.span(), &format!("{key}.org_alias"))?),
    };
    if let (Some(alias), Some(orgs)) = (&org_alias, &orgs)
        && !orgs.contains(alias)
    {
        let span = raw.org_alias.as_ref().map(Spanned::span);
        return Err(ctx.err(span, format!("{key}.org_alias"), "must be one of the identity's orgs"));
    }
    Ok(Policy { orgs, methods, paths, org_alias })
}
