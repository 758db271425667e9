-- lock_release: owner-checked compare-and-delete of the lock and its metadata; optionally close a slot.
-- KEYS[1] lock, KEYS[2] lock metadata hash, KEYS[3] slot marker (optional), KEYS[4] ticks hash (optional)
-- ARGV[1] owner token, ARGV[2] slot outcome: 'done' | 'abort' (with KEYS[3]),
-- ARGV[3] slot marker ttl ms, ARGV[4] JSON describing the tick (stored in KEYS[4] when 'done')
-- Reply: 1 if this owner held the lock and released it, 0 otherwise (it expired or someone else holds it)
local released = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1], KEYS[2])
    released = 1
end
if KEYS[3] then
    if ARGV[2] == 'done' then
        -- The tick's work happened, so the slot is done even if the lock expired meanwhile.
        redis.call('SET', KEYS[3], 'done', 'PX', tonumber(ARGV[3]))
        if KEYS[4] then redis.call('HSET', KEYS[4], 'last', ARGV[4]) end
    elseif ARGV[2] == 'abort' and released == 1 and redis.call('GET', KEYS[3]) == 'running' then
        -- Let another attempt (here or on another daemon) run this slot within its grace.
        redis.call('DEL', KEYS[3])
    end
end
return released
