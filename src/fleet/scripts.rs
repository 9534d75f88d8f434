//! The compare-and-set scripts, each one round trip and atomic in Redis.

use redis::Script;

/// KEYS: lease, fence counter, key fingerprint, key check. ARGV: lease ms,
/// fingerprint. Answers -1 when the fleet's key is another (the fingerprint,
/// seeded when Redis lost both, differs), -2 when only the key check is there
/// (the key check script decides); otherwise draws the next fencing number and takes
/// the lease with it unless held, answering the number, or 0. The numbers
/// never go back, not even after a Redis restart that lost the counter: each
/// is at least the server's clock in milliseconds (replicas take a set only
/// when its number is above the one they hold). Only a counter no whole
/// number below 2^53 holds (written there by someone else) goes back, to the
/// clock's.
const ACQUIRE: &str = r"
local named = redis.call('GET', KEYS[3])
if not named and redis.call('EXISTS', KEYS[4]) == 1 then return -2 end
if not named then redis.call('SET', KEYS[3], ARGV[2]) elseif named ~= ARGV[2] then return -1 end
local t = redis.call('TIME')
local floor = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- The next fence: one past the last, and never behind the clock's ms. A
-- counter no whole number below 2^53 holds (Redis writes such a fence as
-- '1e+17', which no holder's fence then matches, and INCR fails at 2^63) is
-- taken back to the clock's.
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local fence = floor
if last and last >= 0 and last == math.floor(last) and last + 1 < 9007199254740992 and last + 1 > floor then
  fence = last + 1
end
redis.call('SET', KEYS[2], fence)
if redis.call('SET', KEYS[1], fence, 'NX', 'PX', ARGV[1]) then return fence end
return 0
";

/// KEYS: token set, generations. ARGV: the most bytes a set may hold, the
/// credential. Answers the set (empty when there is none, when the key holds
/// another type, or when it is longer than a set can be: read whole, a value
/// written there by anyone with Redis access could take the replica's
/// memory), its TTL in ms, and the credential's generation. Another type
/// under either key is no error (an error marks Redis away).
const READ: &str = r"
local ttl = redis.call('PTTL', KEYS[1])
local announced = false
if redis.call('TYPE', KEYS[2]).ok == 'hash' then announced = redis.call('HGET', KEYS[2], ARGV[2]) end
if redis.call('TYPE', KEYS[1]).ok ~= 'string' then return {'', ttl, announced} end
if redis.call('STRLEN', KEYS[1]) > tonumber(ARGV[1]) then return {'', ttl, announced} end
return {redis.call('GET', KEYS[1]), ttl, announced}
";

/// KEYS: lease. ARGV: fence, lease ms. Extends the lease if still held with `fence`.
const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
";

/// KEYS: lease. ARGV: fence. Deletes the lease if still held with `fence`.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// KEYS: lease, token set, channel, generations, key fingerprint, key check.
/// ARGV: fence, sealed set, TTL ms, news (empty: a quiet rewrite), credential,
/// fingerprint. Answers -1 (nothing written) when the fleet's key is another,
/// -2 when only the key check is there (as ACQUIRE); writes the
/// set only while the lease is held with `fence`; news is published and the
/// credential's generation recorded (for replicas that missed the message).
const WRITE: &str = r"
local named = redis.call('GET', KEYS[5])
if not named and redis.call('EXISTS', KEYS[6]) == 1 then return -2 end
if not named then redis.call('SET', KEYS[5], ARGV[6]) elseif named ~= ARGV[6] then return -1 end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
if ARGV[4] ~= '' then
  -- The generations are a hash: anything else written there is replaced.
  if redis.call('TYPE', KEYS[4]).ok ~= 'hash' then redis.call('DEL', KEYS[4]) end
  redis.call('HSET', KEYS[4], ARGV[5], ARGV[1])
  redis.call('PUBLISH', KEYS[3], ARGV[4])
end
return 1
";

/// KEYS: key check, key fingerprint. ARGV: a value sealed with this
/// replica's key, its fingerprint, `seed` or not, and the key check this
/// replica opened (or empty). Answers the two there (`false` for one absent).
/// The fingerprint, when there, decides; the sealed check is what replicas
/// before the fingerprint compare, and decides only without it. Seeded:
/// with neither there, both are stored; the check is stored again under a
/// fingerprint that is this replica's; the fingerprint is stored beside a
/// check this replica opened (still the one it opened), never beside another.
const KEY_CHECK: &str = r"
local check = redis.call('GET', KEYS[1])
local named = redis.call('GET', KEYS[2])
if ARGV[3] == 'seed' then
  if not check and not named then
    redis.call('SET', KEYS[1], ARGV[1])
    redis.call('SET', KEYS[2], ARGV[2])
    return {ARGV[1], ARGV[2]}
  end
  if not check and named == ARGV[2] then
    redis.call('SET', KEYS[1], ARGV[1])
    check = ARGV[1]
  end
  if not named and check and ARGV[4] ~= '' and check == ARGV[4] then
    redis.call('SET', KEYS[2], ARGV[2])
    named = ARGV[2]
  end
end
return {check, named}
";

/// The scripts, each sent to Redis by its digest (`EVALSHA`, loaded on first use).
pub struct Scripts {
    pub read: Script,
    pub acquire: Script,
    pub extend: Script,
    pub release: Script,
    pub write: Script,
    pub key_check: Script,
    pub spend: Script,
}

pub fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::LazyLock<Scripts> = std::sync::LazyLock::new(|| Scripts {
        read: Script::new(READ),
        acquire: Script::new(ACQUIRE),
        extend: Script::new(EXTEND),
        release: Script::new(RELEASE),
        write: Script::new(WRITE),
        key_check: Script::new(KEY_CHECK),
        spend: Script::new(super::budget::SPEND),
    });
    &SCRIPTS
}
