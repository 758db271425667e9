-- include: lib_time
-- lock_status: the cron lock as it is now; changes nothing.
-- KEYS[1] lock, KEYS[2] lock metadata hash, KEYS[3] fence counter, KEYS[4] ticks hash
-- Reply: JSON {locked, holder, acquired_at_ms, time_held_ms, expires_at_ms, fence, last_tick}
local now = now_ms()
local pttl = redis.call('PTTL', KEYS[1])
local last = redis.call('HGET', KEYS[4], 'last') or ''
local fence = tonumber(redis.call('GET', KEYS[3]) or '0')
if pttl < 0 then
    return cjson.encode({locked = false, fence = fence, last_tick = last, now_ms = now})
end
local meta = redis.call('HMGET', KEYS[2], 'holder', 'acquired_at_ms', 'fence')
local acquired = tonumber(meta[2]) or now
return cjson.encode({
    locked = true,
    holder = meta[1] or '',
    acquired_at_ms = acquired,
    time_held_ms = now - acquired,
    expires_at_ms = now + pttl,
    fence = tonumber(meta[3]) or fence,
    last_tick = last,
    now_ms = now,
})
