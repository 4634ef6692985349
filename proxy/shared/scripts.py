"""The Lua scripts that make each shared decision atomic: one script, one round trip.

Time is Redis's own (``TIME``), so replicas whose clocks disagree cannot mint tokens or
stretch leases; a test may pass its fake clock's time instead (the last argument). Numbers
come back as strings: Redis would truncate a Lua number to an integer.
"""

from __future__ import annotations

# The server's time in seconds, or the caller's when it passes one (tests).
_NOW = """
local function now_s(given)
  if given ~= nil and given ~= '' then return tonumber(given) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# A token bucket read and refilled: the hash holds tokens and the time they were counted.
_REFILL = """
local function refill(key, rate, burst, now)
  local b = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens, ts = tonumber(b[1]), tonumber(b[2])
  if tokens == nil then return burst end
  return math.min(burst, tokens + math.max(0, now - ts) * rate)
end
local function store(key, tokens, rate, burst, now)
  redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', tostring(now))
  -- A full bucket holds nothing a fresh one would not: let it go once it is.
  redis.call('PEXPIRE', key, math.ceil((burst - tokens) / rate * 1000) + 1000)
end
"""

# KEYS: the global bucket, the client's. ARGV: global rate/s, burst, client rate/s, burst,
# [now]. Takes one token from both, or from neither. Returns: global wait s, client wait s,
# the client's tokens after, seconds until the client's bucket is full.
ADMIT = (
    _NOW
    + _REFILL
    + """
local g_rate, g_burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local c_rate, c_burst = tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_s(ARGV[5])
local g = refill(KEYS[1], g_rate, g_burst, now)
local c = refill(KEYS[2], c_rate, c_burst, now)
local g_wait, c_wait = 0, 0
if g < 1 then g_wait = (1 - g) / g_rate end
if c < 1 then c_wait = (1 - c) / c_rate end
if g_wait == 0 and c_wait == 0 then
  g, c = g - 1, c - 1
  store(KEYS[1], g, g_rate, g_burst, now)
  store(KEYS[2], c, c_rate, c_burst, now)
end
return {tostring(g_wait), tostring(c_wait), tostring(c), tostring((c_burst - c) / c_rate)}
"""
)

# KEYS: the client's token bucket. ARGV: rate/s, capacity, cost, [now]. Takes ``cost`` (at
# most the capacity: a request bigger than the bucket waits for a full one) or refuses.
# Returns: wait s, tokens after, seconds until full.
RESERVE = (
    _NOW
    + _REFILL
    + """
local rate, capacity, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_s(ARGV[4])
cost = math.min(cost, capacity)
local tokens = refill(KEYS[1], rate, capacity, now)
local wait = 0
if tokens < cost then wait = (cost - tokens) / rate else
  tokens = tokens - cost
  store(KEYS[1], tokens, rate, capacity, now)
end
return {tostring(wait), tostring(tokens), tostring((capacity - tokens) / rate)}
"""
)

# KEYS: the client's token bucket. ARGV: rate/s, capacity, delta (real cost minus what was
# taken; negative gives back), [now]. A negative balance is debt, paid back by refill.
SETTLE = (
    _NOW
    + _REFILL
    + """
local rate, capacity, delta = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_s(ARGV[4])
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local tokens = math.min(capacity, refill(KEYS[1], rate, capacity, now) - delta)
store(KEYS[1], tokens, rate, capacity, now)
return 1
"""
)

# KEYS: each candidate backend's lease set (a sorted set: member = lease, score = expiry in
# ms), best first as the replica ranks them. ARGV: lease ms, the lease's member name, the
# index of the session's previous backend (0: none), then for each key: its slots, its
# priority, 1 if it has the model loaded. Leases past their expiry are dropped first (a dead
# replica's). Takes a slot on the best backend with room: lowest priority, loaded, least
# busy (the session's backend when it has room). Returns: the chosen key's index (0: none
# had room) and, when none had, ms until the soonest lease among them expires.
CLAIM = (
    _NOW
    + """
local lease_ms, member, prefer = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local now = math.floor(now_s(nil) * 1000)
local best, best_rank, soonest = 0, nil, -1
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local held = redis.call('ZCARD', key)
  local base = 3 + (i - 1) * 3
  local slots, priority = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local loaded = tonumber(ARGV[base + 3])
  if held < slots then
    if i == prefer then best = i; break end
    local rank = priority * 4 + (1 - loaded) * 2 + held / slots
    if best_rank == nil or rank < best_rank then best, best_rank = i, rank end
  else
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if first[2] ~= nil then
      local due = tonumber(first[2]) - now
      if soonest < 0 or due < soonest then soonest = due end
    end
  end
end
if best > 0 then
  redis.call('ZADD', KEYS[best], now + lease_ms, member)
  return {best, 0}
end
return {0, soonest}
"""
)

# KEYS: lease sets, one per lease (repeated as needed). ARGV: lease ms, then the members in
# the order of KEYS: every request of this replica that holds a slot. Extends each lease,
# and puts back the ones that are gone (they lapsed while Redis was out of reach, Redis lost
# them, or the request was admitted alone): the request still runs on that backend, so its
# slot is taken whatever the set said. Returns how many were put back.
RENEW = (
    _NOW
    + """
local lease_ms = tonumber(ARGV[1])
local until_ms = math.floor(now_s(nil) * 1000) + lease_ms
local restored = 0
for i, key in ipairs(KEYS) do
  restored = restored + redis.call('ZADD', key, until_ms, ARGV[i + 1])
end
return restored
"""
)
