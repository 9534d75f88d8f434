//! The compare-and-set scripts, each one round trip and atomic in Redis.

use std::sync::OnceLock;

use redis::Script;

/// KEYS: lease, fence counter. ARGV: lease ms. Draws the next fencing number
/// and takes the lease with it unless held; answers the number, or 0. The
/// numbers never go back, not even after a Redis restart that lost the
/// counter: each is at least the server's clock in milliseconds (replicas take
/// a set only when its number is above the one they hold).
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local floor = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fence = redis.call('INCR', KEYS[2])
if fence < floor then
  fence = floor
  redis.call('SET', KEYS[2], fence)
end
if redis.call('SET', KEYS[1], fence, 'NX', 'PX', ARGV[1]) then return fence end
return 0
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

/// KEYS: lease, token set, channel, generations. ARGV: fence, sealed set, TTL
/// ms, news (empty: a quiet rewrite), credential. Writes the set only while
/// the lease is held with `fence`; news is published and the credential's
/// generation recorded (for replicas that missed the message).
const WRITE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[5], ARGV[1])
  redis.call('PUBLISH', KEYS[3], ARGV[4])
end
return 1
";

/// KEYS: key check. ARGV: a value sealed with this replica's key. Stores it
/// unless one is there, and answers the one there.
const KEY_CHECK: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
";

fn cached(cell: &'static OnceLock<Script>, source: &str) -> &'static Script {
    cell.get_or_init(|| Script::new(source))
}

pub fn acquire() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    cached(&SCRIPT, ACQUIRE)
}

pub fn extend() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    cached(&SCRIPT, EXTEND)
}

pub fn release() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    cached(&SCRIPT, RELEASE)
}

pub fn write() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    cached(&SCRIPT, WRITE)
}

pub fn key_check() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    cached(&SCRIPT, KEY_CHECK)
}
