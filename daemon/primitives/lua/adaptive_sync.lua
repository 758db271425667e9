-- adaptive_sync: retire the adaptive layout of earlier versions, which kept the plan in Redis (a due sorted
-- set and per-section hashes, billed per section). The plan now lives in Postgres and is rebuilt from it by
-- the next planning pass, so nothing watched is lost; the old keys are dropped in one call at start.
-- KEYS[1] old due set, KEYS[2..] the old layout's other keys
-- Reply: how many sections the old due set held (0: nothing to retire)
local held = redis.call('ZCARD', KEYS[1])
if held == 0 and redis.call('EXISTS', unpack(KEYS)) == 0 then
    return 0
end
redis.call('DEL', unpack(KEYS))
return held
