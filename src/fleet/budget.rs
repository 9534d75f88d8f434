//! Rate budgets counted fleet-wide: an identity's `rate_limit` (GCRA on the
//! Redis server's clock) and the `[[limits]]` windows a request counts under,
//! judged and spent together in one script, one round trip.

use std::time::Duration;

use super::{Fleet, FleetError};

/// One budget a request spends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spend {
    /// A token bucket of `per_second` with `burst`, under `key`.
    Rate { key: String, per_second: u32, burst: u32 },
    /// At most `max` per window of `per` (opened by its first request), under `key`.
    Window { key: String, max: u32, per: Duration },
}

/// KEYS: the budgets' keys. ARGV: per budget, a kind (`r` or `w`) and two
/// numbers (`r`: interval µs, tolerance µs; `w`: max, window ms). Looks at
/// every budget first and spends only when all allow (a refused request spends
/// nothing), answering `{0, 0}`, or `{i, wait ms}` for the first refusing.
pub(super) const SPEND: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tats = {}
for i, key in ipairs(KEYS) do
  local kind, a, b = ARGV[3 * i - 2], tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i])
  if kind == 'r' then
    local tat = tonumber(redis.call('GET', key) or '0')
    if tat < now then tat = now end
    local new = tat + a
    if new - now > b + a then return {i, math.ceil((new - now - b - a) / 1000)} end
    tats[i] = new
  else
    local count = tonumber(redis.call('GET', key) or '0')
    if count >= a then
      local ttl = redis.call('PTTL', key)
      if ttl < 0 then ttl = b end
      return {i, ttl}
    end
  end
end
for i, key in ipairs(KEYS) do
  if ARGV[3 * i - 2] == 'r' then
    redis.call('SET', key, tats[i], 'PX', math.ceil((tats[i] - now) / 1000) + 1)
  elseif redis.call('INCR', key) == 1 then
    redis.call('PEXPIRE', key, ARGV[3 * i])
  end
end
return {0, 0}
";

/// How long a budget check may take before the replica judges alone.
const SPEND_TIMEOUT: Duration = Duration::from_millis(250);

impl Fleet {
    /// Spends `budgets` fleet-wide: `None` when all allowed, or the index of
    /// the first that refused and how long until it would allow.
    pub async fn spend<'s>(
        &self,
        budgets: impl IntoIterator<Item = &'s Spend>,
    ) -> Result<Option<(usize, Duration)>, FleetError> {
        if !self.is_connected() {
            // No request waits on a Redis known to be away; the subscription
            // loop notices within a second when it is back.
            return Err(FleetError::Unreachable("Redis was unreachable at the last call".into()));
        }
        let mut connection = self.connection()?;
        let mut invocation = super::scripts::scripts().spend.prepare_invoke();
        for budget in budgets {
            match budget {
                Spend::Rate { key, per_second, burst } => {
                    let interval = 1_000_000 / u64::from((*per_second).max(1));
                    let tolerance = interval * u64::from(burst.saturating_sub(1));
                    invocation.key(format!("{}/budget/{key}", self.settings.key_prefix));
                    invocation.arg("r").arg(interval).arg(tolerance);
                }
                Spend::Window { key, max, per } => {
                    invocation.key(format!("{}/budget/{key}", self.settings.key_prefix));
                    invocation.arg("w").arg(*max).arg(per.as_millis().max(1) as u64);
                }
            }
        }
        let call = invocation.invoke_async::<(u64, u64)>(&mut connection);
        let (refused, wait_ms) = self.call_within(SPEND_TIMEOUT, call).await?;
        Ok((refused > 0).then(|| (refused as usize - 1, Duration::from_millis(wait_ms))))
    }
}
