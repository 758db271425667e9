-- include: lib_time
-- lock_acquire: take the cron lock if free, with a fencing token; optionally for one cron slot.
-- KEYS[1] lock, KEYS[2] lock metadata hash, KEYS[3] fence counter, KEYS[4] slot marker (optional)
-- ARGV[1] owner token, ARGV[2] ttl ms, ARGV[3] holder name, ARGV[4] slot marker ttl ms (with KEYS[4])
-- Reply: JSON {acquired = true, fence, acquired_at_ms, expires_at_ms}   (also when ARGV[1] already holds it)
--           | {acquired = false, holder, acquired_at_ms, expires_at_ms}
--           | {acquired = false, slot_done = true}   (KEYS[4] given and that slot already ran)
local now = now_ms()
local ttl = tonumber(ARGV[2])
if KEYS[4] and redis.call('GET', KEYS[4]) == 'done' then
    return cjson.encode({acquired = false, slot_done = true})
end
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
    -- This owner already holds it: a retry after a lost reply. Hand back the same grant.
    local meta = redis.call('HMGET', KEYS[2], 'acquired_at_ms', 'fence')
    return cjson.encode({acquired = true, fence = tonumber(meta[2]), acquired_at_ms = tonumber(meta[1]),
        expires_at_ms = now + redis.call('PTTL', KEYS[1])})
end
if not current and redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ttl) then
    local fence = redis.call('INCR', KEYS[3])
    redis.call('DEL', KEYS[2])
    redis.call('HSET', KEYS[2], 'holder', ARGV[3], 'owner', ARGV[1], 'acquired_at_ms', now, 'fence', fence)
    redis.call('PEXPIRE', KEYS[2], ttl)
    if KEYS[4] then
        redis.call('SET', KEYS[4], 'running', 'PX', tonumber(ARGV[4]))
    end
    return cjson.encode({acquired = true, fence = fence, acquired_at_ms = now, expires_at_ms = now + ttl})
end
local meta = redis.call('HMGET', KEYS[2], 'holder', 'acquired_at_ms')
local pttl = redis.call('PTTL', KEYS[1])
return cjson.encode({
    acquired = false,
    holder = meta[1] or '',
    acquired_at_ms = tonumber(meta[2]) or 0,
    expires_at_ms = pttl > 0 and now + pttl or now,
})
